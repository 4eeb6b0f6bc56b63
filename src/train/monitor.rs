//! Gradient monitoring: global and per-parameter gradient norms, weight norms and update/weight ratios, and the
//! non-finite guard's names for where a gradient or a weight blew up.

use serde::Serialize;

use crate::model::store::{Buffer, Param};

#[derive(Serialize)]
pub struct LayerStats {
    pub name: String,
    pub grad_norm: f64,
    pub weight_norm: f64,
    /// ‖Δw‖/‖w‖ of the step just taken: ~1e-3 is healthy for SGD; far above means the lr is too high.
    pub update_ratio: f64,
}

#[derive(Serialize)]
pub struct GradReport {
    pub step: u64,
    /// The learning rate of this step (the report's schedule curve).
    pub lr: f32,
    /// The step's training loss (with data parallelism, the mean over every rank's batch): a loss curve per step.
    pub loss: f32,
    pub global_grad_norm: f64,
    pub layers: Vec<LayerStats>,
}

impl LayerStats {
    /// From a parameter's gradient norm, weight norm and the norm of the step's change to its weights.
    pub fn new(name: String, grad_norm: f64, weight_norm: f64, delta_norm: f64) -> LayerStats {
        let update_ratio = if weight_norm > 0.0 { delta_norm / weight_norm } else { 0.0 };
        LayerStats { name, grad_norm, weight_norm, update_ratio }
    }
}

impl GradReport {
    /// `grad_norms`: every parameter's (0 for those without a gradient); `layers`: the trainable ones'.
    pub fn new(step: u64, lr: f32, loss: f32, grad_norms: &[f64], layers: Vec<LayerStats>) -> GradReport {
        let global = grad_norms.iter().map(|g| g * g).sum::<f64>().sqrt();
        GradReport { step, lr, loss, global_grad_norm: global, layers }
    }
}

/// The layer where backward first produced a non-finite gradient: the last one in forward order, since
/// backward runs from the head down and everything below a blow-up inherits it.
pub fn last_nonfinite_grad(params: &[Param]) -> Option<String> {
    params.iter().rev().find(|p| p.grad.as_ref().is_some_and(|g| !g.all_finite())).map(|p| layer_name(&p.name))
}

/// The first parameter whose value is not finite (a blown-up weight, or one a user's checkpoint carried in).
pub fn first_nonfinite_weight(params: &[Param]) -> Option<String> {
    params.iter().find(|p| !p.value.all_finite()).map(|p| layer_name(&p.name))
}

/// The first BN running statistic holding a NaN or an infinity (`bn1.running_var`, say).
pub fn first_nonfinite_buffer(buffers: &[Buffer]) -> Option<String> {
    buffers.iter().find(|b| !b.value.all_finite()).map(|b| b.name.clone())
}

/// What a non-finite step found, gathered by whichever engine ran it.
pub struct NonFinite<'a> {
    pub input_finite: bool,
    /// The first layer whose output went non-finite in the forward pass.
    pub output: Option<&'a str>,
    pub weight: Option<String>,
    pub buffer: Option<String>,
    /// Where backward first produced a non-finite gradient.
    pub grad: Option<String>,
}

impl NonFinite<'_> {
    /// The cause, most specific first: the data, a weight, the first layer whose output blew up in the forward
    /// pass, a running statistic that overflowed, or where backward first produced a non-finite gradient.
    pub fn describe(&self) -> String {
        if !self.input_finite {
            let output = self.output.unwrap_or("none");
            format!("the input batch holds NaN or infinite values (first non-finite output: {output})")
        } else if let Some(layer) = &self.weight {
            format!("weights of {layer} are not finite")
        } else if let Some(layer) = self.output {
            format!("non-finite output, first in {layer}")
        } else if let Some(buffer) = &self.buffer {
            format!("{buffer} overflowed")
        } else if let Some(layer) = &self.grad {
            format!("non-finite gradient, first in {layer}")
        } else {
            "non-finite loss".into()
        }
    }
}

/// The layer a parameter belongs to: `layer2.0.conv1` for `layer2.0.conv1.weight`.
pub fn layer_name(param: &str) -> String {
    param.rsplit_once('.').map(|(layer, _)| layer.to_string()).unwrap_or_else(|| param.to_string())
}
