//! Post-training static quantization's calibration (`resnet quantize`): the uint8 parameters of every
//! convolution's input, from the ranges its inputs take on calibration images, carried in the weights file's
//! metadata (key `quantization`) next to the unchanged f32 weights, so one file runs in f32 and, with
//! `--dtype int8`, in int8 (`exec::cpu_plan::CpuPlan::int8`: weights quantized per channel as the plan is built).
//!
//! Methods: `minmax` (ONNX Runtime's default: the range seen, widened to hold 0) and `percentile` (the range
//! clipped to the 99.99th percentile of |x| per convolution input, ORT's `Percentile` default: a few outliers
//! then no longer stretch the scale of all the other values).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::Tensor;
use crate::engine::cpu::int8::QuantParams;
use crate::error::{Error, Result};
use crate::exec::cpu_plan::CpuPlan;
use crate::model::ResNet;

/// The metadata key of a quantized weights file.
pub const METADATA_KEY: &str = "quantization";

/// How the ranges are turned into parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Minmax,
    Percentile,
}

/// The percentile of |x| that `Method::Percentile` keeps.
pub const PERCENTILE: f64 = 99.99;

/// The calibrated input parameters per convolution (by its torchvision name), and how they were found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub method: Method,
    /// Calibration images.
    pub images: usize,
    /// conv name → [scale, zero point].
    pub inputs: BTreeMap<String, (f32, u8)>,
}

impl Calibration {
    pub fn input(&self, conv: &str) -> Option<QuantParams> {
        let &(scale, zero_point) = self.inputs.get(conv)?;
        (scale > 0.0 && scale.is_finite()).then_some(QuantParams { scale, zero_point })
    }

    /// From a file's metadata: None when it holds no calibration; an error naming `file` when it holds a bad one.
    pub fn from_metadata(metadata: &BTreeMap<String, String>, file: &std::path::Path) -> Result<Option<Calibration>> {
        let Some(text) = metadata.get(METADATA_KEY) else { return Ok(None) };
        let bad = |why: String| Error::file(file, format!("bad `{METADATA_KEY}` metadata: {why}"));
        let c: Calibration = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if let Some((name, (scale, _))) = c.inputs.iter().find(|(_, (s, _))| !(s.is_finite() && *s > 0.0)) {
            return Err(bad(format!("the input scale of {name} is {scale}, not a positive number")));
        }
        Ok(Some(c))
    }

    pub fn to_metadata(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The calibration of `model` (f32, on the CPU) over the batches `batches` hands its visitor, once per pass.
pub fn calibrate(
    model: ResNet,
    method: Method,
    mut batches: impl FnMut(&mut dyn FnMut(&Tensor)) -> Result<()>,
) -> Result<Calibration> {
    let names = model.graph.units.iter().map(|u| u.conv.clone()).collect();
    let plan = CpuPlan::new(model, false).expect("an f32 plan runs on every CPU");
    let mut c = Calibrator::new(method, names);
    for pass in 0..c.passes() {
        if pass > 0 {
            c.next_pass();
        }
        batches(&mut |x| c.observe(&plan, x))?;
    }
    c.finish()
}

/// Bins of the |x| histograms of `Method::Percentile`, over [0, max|x|] of each input.
const BINS: usize = 4096;

/// Collects each convolution input's range over calibration batches, and for `percentile` in a second pass
/// over the same batches a histogram of |x| within it.
struct Calibrator {
    method: Method,
    names: Vec<String>,
    ranges: Vec<(f32, f32)>,
    /// Per input: the counts of |x| in `BINS` bins up to its max|x| (second pass only).
    histograms: Option<Vec<Vec<u64>>>,
    images: usize,
}

impl Calibrator {
    pub fn new(method: Method, names: Vec<String>) -> Calibrator {
        let ranges = vec![(f32::INFINITY, f32::NEG_INFINITY); names.len()];
        Calibrator { method, names, ranges, histograms: None, images: 0 }
    }

    /// The passes over the calibration images `finish` needs: 1 for min/max, 2 for a percentile.
    pub fn passes(&self) -> usize {
        if self.method == Method::Percentile { 2 } else { 1 }
    }

    /// Starts the next pass (the histograms' bins come from the first pass's ranges).
    pub fn next_pass(&mut self) {
        self.histograms = Some(vec![vec![0; BINS]; self.names.len()]);
    }

    /// Runs `plan` (f32) on a batch and widens every unit's input range, or fills its histogram.
    pub fn observe(&mut self, plan: &CpuPlan, batch: &Tensor) {
        let first = self.histograms.is_none();
        let ranges = std::sync::Mutex::new(std::mem::take(&mut self.ranges));
        let histograms = std::sync::Mutex::new(self.histograms.take());
        let top: Vec<f32> =
            ranges.lock().map(|r| r.iter().map(|&(l, h)| l.abs().max(h.abs())).collect()).unwrap_or_default();
        plan.visit_inputs(batch, &|u, input| {
            if first {
                let (lo, hi) =
                    input.data().iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                if let Ok(mut r) = ranges.lock() {
                    r[u] = (r[u].0.min(lo), r[u].1.max(hi));
                }
                return;
            }
            let per_bin = top[u] / BINS as f32;
            let mut counts = vec![0u64; BINS];
            for &v in input.data() {
                let bin = if per_bin > 0.0 { (v.abs() / per_bin) as usize } else { 0 };
                counts[bin.min(BINS - 1)] += 1;
            }
            if let Ok(mut h) = histograms.lock()
                && let Some(h) = h.as_mut()
            {
                h[u].iter_mut().zip(&counts).for_each(|(a, b)| *a += b);
            }
        });
        self.ranges = ranges.into_inner().unwrap_or_default();
        self.histograms = histograms.into_inner().unwrap_or_default();
        if first {
            self.images += batch.shape()[0];
        }
    }

    pub fn finish(self) -> Result<Calibration> {
        if self.images == 0 {
            return Err(Error::invalid("no calibration images"));
        }
        let mut inputs = BTreeMap::new();
        for (u, (name, &(lo, hi))) in self.names.iter().zip(&self.ranges).enumerate() {
            if !(lo.is_finite() && hi.is_finite()) {
                return Err(Error::invalid(format!(
                    "the input of {name} was not finite on the calibration images: the weights are broken"
                )));
            }
            let (lo, hi) = match self.histograms.as_ref().map(|h| &h[u]) {
                Some(counts) if self.method == Method::Percentile => {
                    let total: u64 = counts.iter().sum();
                    let keep = (total as f64 * PERCENTILE / 100.0).ceil() as u64;
                    let (mut seen, mut bin) = (0, 0);
                    while bin < BINS && seen < keep {
                        seen += counts[bin];
                        bin += 1;
                    }
                    let clip = lo.abs().max(hi.abs()) * bin as f32 / BINS as f32;
                    (lo.max(-clip), hi.min(clip))
                }
                _ => (lo, hi),
            };
            let p = QuantParams::covering(lo, hi);
            inputs.insert(name.clone(), (p.scale, p.zero_point));
        }
        Ok(Calibration { method: self.method, images: self.images, inputs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_unusable_scales_are_refused() {
        let file = std::path::Path::new("q.safetensors");
        let c = Calibration {
            method: Method::Percentile,
            images: 3,
            inputs: BTreeMap::from([("conv1".to_string(), (0.25, 7))]),
        };
        let meta = BTreeMap::from([(METADATA_KEY.to_string(), c.to_metadata())]);
        assert_eq!(Calibration::from_metadata(&meta, file).unwrap(), Some(c));
        assert_eq!(Calibration::from_metadata(&BTreeMap::new(), file).unwrap(), None);
        for scale in ["1e39", "-1", "0"] {
            let text = format!(r#"{{"method":"minmax","images":1,"inputs":{{"conv1":[{scale},0]}}}}"#);
            let meta = BTreeMap::from([(METADATA_KEY.to_string(), text)]);
            let e = Calibration::from_metadata(&meta, file).unwrap_err().to_string();
            assert!(e.contains("q.safetensors") && e.contains("conv1"), "{scale}: {e}");
        }
    }
}
