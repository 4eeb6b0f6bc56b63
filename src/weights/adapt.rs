//! A pretrained stem for another number of input channels, exactly as timm's `adapt_input_conv`
//! (`timm/models/_manipulate.py`, timm 1.0): to 1 channel the RGB filters are summed (a grey image through the
//! summed filter gives what the RGB filters gave its replicated bands); to N channels the RGB filters are
//! repeated ceil(N/3) times, cut to N and scaled by 3/N, so that the first layer's response keeps its scale.
//! `tests/fixtures/adapt_input_conv.safetensors` holds timm's own outputs for 1, 2, 4 and 13 channels.

use crate::engine::Tensor;
use crate::error::{Error, Result};

/// `weight` ([O, I, K, K], I the channels it was trained on) adapted to `in_chans` input channels.
pub fn adapt_input_conv(weight: &Tensor, in_chans: usize) -> Result<Tensor> {
    let [o, i, kh, kw] = <[usize; 4]>::try_from(weight.shape())
        .map_err(|_| Error::invalid(format!("conv1.weight {:?} is not a 4-D convolution weight", weight.shape())))?;
    if in_chans == 0 {
        return Err(Error::invalid("a stem for 0 input channels"));
    }
    if in_chans == i {
        return Ok(weight.clone());
    }
    let plane = kh * kw;
    let src = weight.data();
    let mut out = vec![0f32; o * in_chans * plane];
    if in_chans == 1 {
        // timm sums over the input channels (groups of 3 for space-to-depth stems, which ResNet has not).
        for (f, dst) in out.chunks_exact_mut(plane).enumerate() {
            for c in 0..i {
                let from = &src[(f * i + c) * plane..][..plane];
                dst.iter_mut().zip(from).for_each(|(d, &s)| *d += s);
            }
        }
    } else {
        if i != 3 {
            return Err(Error::invalid(format!(
                "conv1.weight has {i} input channels: only an RGB (3-channel) stem can be adapted to {in_chans} channels (timm's rule)"
            )));
        }
        // timm multiplies by the Python float 3/N, which torch rounds to f32 once.
        let scale = (3.0f64 / in_chans as f64) as f32;
        for f in 0..o {
            for c in 0..in_chans {
                let from = &src[(f * i + c % i) * plane..][..plane];
                let dst = &mut out[(f * in_chans + c) * plane..][..plane];
                dst.iter_mut().zip(from).for_each(|(d, &s)| *d = s * scale);
            }
        }
    }
    Tensor::new(&[o, in_chans, kh, kw], out)
}
