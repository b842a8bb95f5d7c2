//! Random weights with the real shapes: lets benchmarks and memory checks run a 2B/7B-shaped
//! model with no download. Values follow the initialisation hints of candle-nn's layers; tensors
//! requested without a hint get N(0, 0.02), like the reference's initialiser.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// A weight source that invents every tensor it is asked for.
pub struct RandomWeights;

impl RandomWeights {
    pub fn var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match h {
            Init::Const(v) if v != 0.0 => Tensor::full(v as f32, s, dev)?,
            Init::Const(_) => Tensor::randn(0f32, 0.02, s, dev)?,
            // detach: a variable would make every op record a backprop graph and keep all
            // intermediate activations alive
            other => other.var(s, DType::F32, dev)?.as_tensor().detach(),
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
