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
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
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
            DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| {
                anyhow::anyhow!("cannot open CUDA device 0 ({e}); build with `--features cuda` on a machine with an NVIDIA GPU")
            })?,
            DeviceArg::Metal => Device::new_metal(0).map_err(|e| {
                anyhow::anyhow!("cannot open Metal device 0 ({e}); build with `--features metal` on macOS")
            })?,
        })
    }
}
