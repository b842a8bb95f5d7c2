//! Subcommand implementations of the binary (flag structs and glue; the work is in the library).

pub mod bench;
pub mod calibrate;
pub mod devices;
pub mod do_action;
pub mod generate;
pub mod ground;
pub mod mcp;
pub mod parse;
pub mod replay;
pub mod report;
pub mod run;
pub mod screenshot;
pub mod serve;
pub mod tasks;
pub mod test;
pub mod tools;

use candle_core::{DType, Device};

/// `--dtype` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// bf16 where the engine multiplies it fast (CUDA, or an x86-64 CPU with AVX512-BF16 or AVX2
    /// + FMA: half the memory of f32 and faster), f32 elsewhere.
    Auto,
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    /// The dtype to load the model in on `device`.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            DtypeArg::Auto => match device {
                Device::Cuda(_) => DType::BF16,
                Device::Cpu if vlad::engine::cpu_has_fast_bf16() => DType::BF16,
                _ => DType::F32,
            },
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

/// `--device` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

impl DeviceArg {
    pub fn open(self) -> anyhow::Result<Device> {
        Ok(match self {
            DeviceArg::Cpu => Device::Cpu,
            // one stream for all the engine's work, whichever thread queues it: candle's
            // default (each host thread's own default stream) would let the decoder, which runs
            // on rayon's threads, race the caller's thread that reads its logits
            DeviceArg::Cuda => Device::new_cuda_with_stream(0).map_err(|e| {
                anyhow::anyhow!("cannot open CUDA device 0 ({e}); build with `--features cuda` on a machine with an NVIDIA GPU")
            })?,
            DeviceArg::Metal => Device::new_metal(0).map_err(|e| {
                anyhow::anyhow!("cannot open Metal device 0 ({e}); build with `--features metal` on macOS")
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtype_is_bf16_only_where_the_cpu_multiplies_it() {
        let expected = if vlad::engine::cpu_has_fast_bf16() {
            DType::BF16
        } else {
            DType::F32
        };
        assert_eq!(DtypeArg::Auto.resolve(&Device::Cpu), expected);
        assert_eq!(DtypeArg::F32.resolve(&Device::Cpu), DType::F32);
        assert_eq!(DtypeArg::Bf16.resolve(&Device::Cpu), DType::BF16);
    }
}
