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
    pub global_grad_norm: f64,
    pub layers: Vec<LayerStats>,
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

/// Statistics of the step from `before` (weights before the optimiser step) to the current parameters.
pub fn report(step: u64, params: &[Param], grad_norms: &[f64], before: &[Vec<f32>]) -> GradReport {
    let layers: Vec<LayerStats> = params
        .iter()
        .zip(grad_norms)
        .zip(before)
        .filter(|((p, _), _)| p.trainable)
        .map(|((p, &g), b)| {
            let w = norm(p.value.data());
            let delta: f64 = p.value.data().iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
            LayerStats { name: p.name.clone(), grad_norm: g, weight_norm: w, update_ratio: if w > 0.0 { delta / w } else { 0.0 } }
        })
        .collect();
    let global = grad_norms.iter().map(|g| g * g).sum::<f64>().sqrt();
    GradReport { step, global_grad_norm: global, layers }
}

/// Per-parameter gradient norms (0 for parameters without a gradient).
pub fn grad_norms(params: &[Param]) -> Vec<f64> {
    params.iter().map(|p| p.grad.as_ref().map(|g| norm(g.data())).unwrap_or(0.0)).collect()
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

fn layer_name(param: &str) -> String {
    param.rsplit_once('.').map(|(layer, _)| layer.to_string()).unwrap_or_else(|| param.to_string())
}
