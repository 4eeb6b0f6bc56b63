//! Optimisers and schedules against PyTorch.
//!
//! Whole-network: three training steps of the reduced ResNet-34 (det_init weights, the input and target of
//! net_resnet34_w8.safetensors) with SGD, Adam and AdamW against torch.optim in float64
//! (python/fixtures/optim.py): each step's loss, the logits of a fourth train-mode forward, sampled final
//! weights and momentum buffers, bn1's running statistics, all within 1e-4 (relative error ‖a−b‖/‖b‖). SGD
//! runs at lr 1e-4 because larger steps make this network's trajectory chaotic (see python/fixtures/optim.py).
//! Small cases pin the exact update formulas (Nesterov, L2 vs decoupled decay, per-group lr, momentum
//! override) against numbers from float32 torch, and the schedules against torch.optim.lr_scheduler.

mod common;

use std::collections::BTreeMap;

use common::{Fixture, assert_close, assert_close_slice, det_net, rel_err};
use resnet_rs::Cpu;
use resnet_rs::engine::{Backend, Tensor, one_hot};
use resnet_rs::model::store::Param;
use resnet_rs::train::optim::{Optimizer, OptimizerKind, ParamGroup, clip_coefficient};
use resnet_rs::train::schedule::Schedule;
use resnet_rs::train::steps::{CpuSteps, Steps};
use resnet_rs::{Mode, ResNet, ResNetConfig};

const TOL: f64 = 1e-4;
/// Per-parameter guard beside the 1e-4 bound on each whole sample set: a bug confined to one parameter would
/// otherwise hide in the set's norm. It cannot be 1e-4: a parameter of 16 samples with near-zero gradients is
/// noisy under Adam's normalised update (float32 PyTorch itself misses its float64 AdamW reference by 5.5e-4
/// on layer2.1.bn1.bias).
const PER_PARAM_TOL: f64 = 1e-2;

fn meta<T: std::str::FromStr>(f: &Fixture, key: &str) -> T {
    f.metadata.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("fixture metadata lacks {key}"))
}

fn adam_kind(decoupled: bool) -> OptimizerKind {
    let (beta1, beta2, eps) = (0.9, 0.999, 1e-8);
    if decoupled { OptimizerKind::AdamW { beta1, beta2, eps } } else { OptimizerKind::Adam { beta1, beta2, eps } }
}

struct Trained {
    model: ResNet,
    opt: Optimizer,
    losses: Vec<f32>,
}

/// `steps` × (zero_grad, train-mode forward, mean cross-entropy, backward, step), as optim.py does.
fn train(f: &Fixture, kind: OptimizerKind, lr: f32, wd: f32, steps: usize) -> Trained {
    let net = Fixture::load("net_resnet34_w8.safetensors");
    let mut model = det_net(f);
    let groups = vec![ParamGroup { lr_scale: 1.0, weight_decay: wd }; model.store.params.len()];
    let mut opt = Optimizer::new(kind, groups);
    let target = one_hot(&net.usizes("target"), 10, 0.0);
    let mut losses = Vec::new();
    for _ in 0..steps {
        model.store.zero_grad();
        let logits = model.forward(&Cpu::F32, net.get("input"), Mode::Train);
        let (loss, dlogits) = Cpu::F32.softmax_cross_entropy(&logits, &target);
        model.backward(&Cpu::F32, &dlogits, false);
        opt.step(&mut model.store.params, lr, None);
        losses.push(loss);
    }
    Trained { model, opt, losses }
}

/// optim.py's sample: flat elements i·max(1, numel / k) for i < min(k, numel).
fn sample(t: &Tensor, k: usize) -> Vec<f32> {
    let stride = (t.numel() / k).max(1);
    (0..k.min(t.numel())).map(|i| t.data()[i * stride]).collect()
}

/// Compare per-parameter samples of `get(param)` with the concatenation stored under `key`: the whole set within
/// `tol`, each parameter within PER_PARAM_TOL.
#[track_caller]
fn check_samples<'a>(
    f: &Fixture,
    key: &str,
    k: usize,
    params: &'a [Param],
    get: impl Fn(&'a Param) -> &'a Tensor,
    tol: f64,
) {
    let names: Vec<&str> = f.metadata["params"].split(',').collect();
    let ours: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(ours, names, "parameter order differs from torch's named_parameters()");
    let want = f.get(key).data();
    let mut got = Vec::new();
    let mut worst = (String::new(), 0.0f64);
    for p in params {
        let s = sample(get(p), k);
        let e = rel_err(&s, &want[got.len()..got.len() + s.len()]);
        if e > worst.1 {
            worst = (p.name.clone(), e);
        }
        got.extend(s);
    }
    assert_eq!(got.len(), want.len(), "{key}: sample count");
    let all = rel_err(&got, want);
    eprintln!(
        "{key}: relative error {all:.2e} over {} samples; worst parameter {} at {:.2e}",
        got.len(),
        worst.0,
        worst.1
    );
    assert!(all <= tol, "{key}: relative error {all:.3e} exceeds {tol:.0e}");
    assert!(
        worst.1 <= PER_PARAM_TOL,
        "{key}: {} has relative error {:.3e}, over {PER_PARAM_TOL:.0e}",
        worst.0,
        worst.1
    );
}

#[test]
fn sgd_three_steps_match_torch() {
    let f = Fixture::load("optim_sgd.safetensors");
    let (lr, momentum, wd) = (meta(&f, "sgd_lr"), meta(&f, "sgd_momentum"), meta(&f, "sgd_weight_decay"));
    let mut t = train(&f, OptimizerKind::Sgd { momentum, nesterov: false }, lr, wd, meta(&f, "steps"));
    eprintln!("loss: relative error {:.2e}", rel_err(&t.losses, f.get("loss").data()));
    assert_close_slice("losses", &t.losses, f.get("loss"), TOL);
    let net = Fixture::load("net_resnet34_w8.safetensors");
    let logits = t.model.forward(&Cpu::F32, net.get("input"), Mode::Train);
    eprintln!("logits_after: relative error {:.2e}", rel_err(logits.data(), f.get("logits_after").data()));
    assert_close("logits after", &logits, f.get("logits_after"), TOL);

    let k: usize = meta(&f, "samples");
    let params = &t.model.store.params;
    check_samples(&f, "w", k, params, |p| &p.value, TOL);
    let (state, steps) = t.opt.state(params);
    assert_eq!(steps, meta::<u64>(&f, "steps"));
    check_samples(&f, "buf", k, params, |p| &state[&format!("{}.momentum_buffer", p.name)], TOL);
    let bn1 = |name: &str| t.model.state_dict()[name].clone();
    for key in ["bn1.running_mean", "bn1.running_var"] {
        let want = f.get(&format!("running.{key}"));
        eprintln!("{key}: relative error {:.2e}", rel_err(bn1(key).data(), want.data()));
        assert_close(key, &bn1(key), want, TOL);
    }
}

fn adam_matches(prefix: &str, decoupled: bool) {
    let f = Fixture::load("optim_sgd.safetensors");
    let lr = meta(&f, &format!("{prefix}_lr"));
    let wd = meta(&f, &format!("{prefix}_weight_decay"));
    let t = train(&f, adam_kind(decoupled), lr, wd, meta(&f, "steps"));
    eprintln!("{prefix}.loss: relative error {:.2e}", rel_err(&t.losses, f.get(&format!("{prefix}.loss")).data()));
    assert_close_slice(&format!("{prefix} losses"), &t.losses, f.get(&format!("{prefix}.loss")), TOL);
    check_samples(&f, &format!("{prefix}.w"), meta(&f, "adam_samples"), &t.model.store.params, |p| &p.value, TOL);
}

#[test]
fn adam_three_steps_match_torch() {
    adam_matches("adam", false);
}

#[test]
fn adamw_three_steps_match_torch() {
    adam_matches("adamw", true);
}

// ---------------------------------------------------------------------------------------------------------
// Exact update formulas on small tensors, against float32 PyTorch.

fn param(name: &str, shape: &[usize], values: &[f32]) -> Param {
    Param { name: name.into(), value: Tensor::new(shape, values.to_vec()).unwrap(), grad: None, trainable: true }
}

fn small_params() -> Vec<Param> {
    vec![param("a", &[5], &[0.5, -1.0, 2.0, 0.0, -0.25]), param("fc.weight", &[2, 2], &[0.3, -0.7, 1.5, 0.05])]
}

/// Gradients of the three steps, per parameter of `small_params`.
const SMALL_GRADS: [[&[f32]; 2]; 3] = [
    [&[0.1, -0.2, 0.3, 0.4, -0.5], &[1.0, -2.0, 0.5, 0.0]],
    [&[0.05, 0.1, -0.3, 0.2, 0.0], &[-1.0, 0.25, 0.5, 3.0]],
    [&[-0.2, 0.3, 0.1, -0.4, 0.6], &[0.5, 0.5, -1.5, 1.0]],
];

fn set_grads(params: &mut [Param], step: usize) {
    for (p, g) in params.iter_mut().zip(SMALL_GRADS[step]) {
        p.grad = Some(Tensor::new(p.value.shape(), g.to_vec()).unwrap());
    }
}

/// Three steps at base lr 0.1: "a" with weight decay 0.01, "fc.weight" at half the lr without decay; the
/// second step overrides momentum / beta1 with 0.8. The expected values come from float32 torch:
///
/// ```python
/// import numpy as np, torch
/// P0 = {"a": [0.5, -1.0, 2.0, 0.0, -0.25], "fc.weight": [0.3, -0.7, 1.5, 0.05]}
/// G = [{"a": [0.1, -0.2, 0.3, 0.4, -0.5], "fc.weight": [1.0, -2.0, 0.5, 0.0]},
///      {"a": [0.05, 0.1, -0.3, 0.2, 0.0], "fc.weight": [-1.0, 0.25, 0.5, 3.0]},
///      {"a": [-0.2, 0.3, 0.1, -0.4, 0.6], "fc.weight": [0.5, 0.5, -1.5, 1.0]}]
/// MOM = [None, 0.8, None]  # momentum / beta1 override at each step
/// def run(make, key):
///     ps = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for k, v in P0.items()}
///     opt = make([{"params": [ps["a"]], "weight_decay": 0.01},
///                 {"params": [ps["fc.weight"]], "lr": 0.05, "weight_decay": 0.0}])
///     default = [g[key] for g in opt.param_groups]
///     for g, m in zip(G, MOM):
///         for grp, d in zip(opt.param_groups, default):
///             grp[key] = d if m is None else ((m, d[1]) if key == "betas" else m)
///         for k, p in ps.items(): p.grad = torch.tensor(g[k], dtype=torch.float32)
///         opt.step()
///     return {k: [repr(np.float32(x)) for x in p.detach().numpy()] for k, p in ps.items()}
/// print(run(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True), "momentum"))
/// print(run(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), "momentum"))
/// print(run(lambda g: torch.optim.Adam(g, lr=0.1), "betas"))
/// print(run(lambda g: torch.optim.AdamW(g, lr=0.1, weight_decay=0.5), "betas"))  # groups set their own decay
/// ```
fn small_run(kind: OptimizerKind) -> Vec<Param> {
    let mut params = small_params();
    let groups =
        vec![ParamGroup { lr_scale: 1.0, weight_decay: 0.01 }, ParamGroup { lr_scale: 0.5, weight_decay: 0.0 }];
    let mut opt = Optimizer::new(kind, groups);
    for (step, m) in [None, Some(0.8), None].into_iter().enumerate() {
        set_grads(&mut params, step);
        opt.step(&mut params, 0.1, m);
    }
    assert_eq!(opt.steps_taken(), 3);
    params
}

#[track_caller]
fn assert_small(kind: OptimizerKind, a: [f32; 5], fc: [f32; 4]) {
    let params = small_run(kind);
    for (p, want) in params.iter().zip([&a[..], &fc[..]]) {
        let e = rel_err(p.value.data(), want);
        // float32 on both sides, same operation order: equal up to a rounding or two.
        assert!(e <= 2e-7, "{kind:?} {}: {:?} vs torch {want:?} (relative error {e:.2e})", p.name, p.value.data());
    }
}

#[test]
fn sgd_update_matches_torch_exactly() {
    assert_small(
        OptimizerKind::Sgd { momentum: 0.9, nesterov: false },
        [0.48263434, -0.99324864, 1.9606504, -0.098632045, -0.18283114],
        [0.24399999, -0.49674997, 1.4645001, -0.285],
    );
}

#[test]
fn sgd_nesterov_update_matches_torch_exactly() {
    assert_small(
        OptimizerKind::Sgd { momentum: 0.9, nesterov: true },
        [0.48934248, -1.0118166, 1.9484812, -0.10326046, -0.20316772],
        [0.22360002, -0.461325, 1.49755, -0.4365],
    );
}

#[test]
fn adam_update_matches_torch_exactly() {
    assert_small(
        adam_kind(false),
        [0.3427515, -0.9548067, 1.9507945, -0.18916152, -0.1374867],
        [0.27902535, -0.6317341, 1.4157344, -0.0539464],
    );
}

#[test]
fn adamw_update_matches_torch_exactly() {
    // "a" differs from Adam's (decay decoupled), "fc.weight" (no decay) is the same.
    assert_small(
        adam_kind(true),
        [0.34610635, -0.961608, 1.9603574, -0.18940942, -0.13768534],
        [0.27902535, -0.6317341, 1.4157344, -0.0539464],
    );
}

// ---------------------------------------------------------------------------------------------------------
// Clipping, grouping, freezing, checkpointed state.

#[test]
fn clipping_scales_trainable_gradients_to_max_norm() {
    // The loop's clipping (`Trainer::step`): the global norm from `Steps::grad_sumsq` summed in parameter order,
    // torch's coefficient max / (norm + 1e-6), applied by `Steps::scale_gradients` to trainable parameters only.
    let mut model = ResNet::new(ResNetConfig::new("resnet18".parse().unwrap(), 2), 0);
    let params = &mut model.store.params;
    let (a, b, frozen) = (params.len() - 2, params.len() - 1, 0);
    params[a].grad = Some(Tensor::new(params[a].value.shape(), vec![0.0; params[a].value.numel()]).unwrap());
    params[a].grad.as_mut().unwrap().data_mut()[..2].copy_from_slice(&[3.0, 4.0]);
    params[b].grad = Some(Tensor::new(params[b].value.shape(), vec![0.0; params[b].value.numel()]).unwrap());
    params[b].grad.as_mut().unwrap().data_mut()[0] = 12.0;
    params[frozen].grad =
        Some(Tensor::new(params[frozen].value.shape(), vec![100.0; params[frozen].value.numel()]).unwrap());
    params[frozen].trainable = false; // not counted, not scaled: the update would not apply it either
    let mut steps = CpuSteps::default();
    let norm = |steps: &CpuSteps, model: &ResNet| steps.grad_sumsq(model).unwrap().iter().sum::<f64>().sqrt();
    assert_eq!(norm(&steps, &model), 13.0); // sqrt(9 + 16 + 144)

    // Under the limit: no coefficient, nothing changes.
    assert_eq!(clip_coefficient(13.0, 20.0), None);
    // Over it: coef = 6.5 / (13 + 1e-6), so the norm lands just under 6.5.
    let coef = clip_coefficient(13.0, 6.5).unwrap();
    assert_eq!(coef, (6.5f64 / (13.0 + 1e-6)) as f32);
    assert_eq!(clip_coefficient(f64::NAN, 6.5), None);
    steps.scale_gradients(&mut model, coef).unwrap();
    let params = &model.store.params;
    assert_eq!(&params[a].grad.as_ref().unwrap().data()[..2], &[3.0 * coef, 4.0 * coef]);
    assert_eq!(params[b].grad.as_ref().unwrap().data()[0], 12.0 * coef);
    assert!(params[frozen].grad.as_ref().unwrap().data().iter().all(|&v| v == 100.0));
    let after = norm(&steps, &model);
    assert!((after - 6.5).abs() < 1e-5 && after < 6.5, "{after}");
}

#[test]
fn groups_exempt_one_d_parameters_and_scale_the_head() {
    let model = ResNet::new(ResNetConfig::new("resnet18".parse().unwrap(), 10), 0);
    let params = &model.store.params;
    let plain = Optimizer::groups_for(params, 1e-4, false, 10.0);
    let split = Optimizer::groups_for(params, 1e-4, true, 10.0);
    assert_eq!(plain.len(), params.len());
    let mut exempt = 0;
    for ((p, a), b) in params.iter().zip(&plain).zip(&split) {
        let head = p.name.starts_with("fc.");
        assert_eq!(a.lr_scale, if head { 10.0 } else { 1.0 }, "{}", p.name);
        assert_eq!(a.lr_scale, b.lr_scale);
        assert_eq!(a.weight_decay, 1e-4, "{}", p.name);
        let one_d = p.name.contains("bn") || p.name.contains("downsample.1") || p.name == "fc.bias";
        assert_eq!(p.value.shape().len() == 1, one_d, "{}", p.name);
        assert_eq!(b.weight_decay, if one_d { 0.0 } else { 1e-4 }, "{}", p.name);
        exempt += one_d as usize;
    }
    assert_eq!(exempt, 2 * 20 + 1, "resnet18: 20 BN layers (weight and bias each) and fc.bias");
}

#[test]
fn frozen_parameters_are_untouched() {
    let f = Fixture::load("optim_sgd.safetensors");
    let net = Fixture::load("net_resnet34_w8.safetensors");
    let mut model = det_net(&f);
    let before = model.state_dict();
    model.set_trainable(&["conv1.", "bn1.", "layer1."], false);
    let target = one_hot(&net.usizes("target"), 10, 0.0);
    for kind in [OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, adam_kind(true)] {
        let mut opt = Optimizer::new(kind, Optimizer::groups_for(&model.store.params, 0.01, false, 1.0));
        for _ in 0..2 {
            model.store.zero_grad();
            let logits = model.forward(&Cpu::F32, net.get("input"), Mode::Train);
            let (_, dlogits) = Cpu::F32.softmax_cross_entropy(&logits, &target);
            model.backward(&Cpu::F32, &dlogits, false);
            opt.step(&mut model.store.params, 0.01, None);
        }
        let (state, _) = opt.state(&model.store.params);
        for p in &model.store.params {
            let frozen = !p.trainable;
            assert_eq!(p.value == before[&p.name], frozen, "{kind:?}: {} changed: {}", p.name, !frozen);
            assert_eq!(state.keys().any(|k| k.starts_with(&format!("{}.", p.name))), !frozen, "{} state", p.name);
        }
    }
}

/// Runs `steps` steps from `opt`'s current state on `params` with the small gradients; the third step's
/// gradient also goes to "c", which has none before it (so the first two steps must skip it).
fn small_steps(opt: &mut Optimizer, params: &mut [Param], steps: std::ops::Range<usize>) {
    for step in steps {
        set_grads(params, step);
        params[2].grad = (step == 2).then(|| Tensor::new(&[3], vec![0.5, -0.5, 1.0]).unwrap());
        opt.step(params, 0.1, None);
    }
}

#[test]
fn state_round_trips_through_a_checkpoint_bit_for_bit() {
    let kinds = [OptimizerKind::Sgd { momentum: 0.9, nesterov: true }, adam_kind(false), adam_kind(true)];
    let fresh = || {
        let mut p = small_params();
        p.push(param("c", &[3], &[1.0, 2.0, 3.0]));
        p
    };
    let groups = vec![ParamGroup { lr_scale: 1.0, weight_decay: 0.01 }; 3];
    for kind in kinds {
        let mut straight = fresh();
        let mut opt = Optimizer::new(kind, groups.clone());
        small_steps(&mut opt, &mut straight, 0..3);

        let mut resumed = fresh();
        let mut first = Optimizer::new(kind, groups.clone());
        small_steps(&mut first, &mut resumed, 0..2);
        let (state, steps) = first.state(&resumed);
        assert_eq!(steps, 2);
        assert!(!state.keys().any(|k| k.starts_with("c.")), "c had no gradient yet: {:?}", state.keys());
        // Through a file, as a checkpoint would: the step count in the metadata.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optim.safetensors");
        let meta = BTreeMap::from([("steps".to_string(), steps.to_string())]);
        resnet_rs::weights::safetensors::save(&path, &state, &BTreeMap::new(), &meta).unwrap();
        let loaded = resnet_rs::weights::safetensors::load(&path).unwrap();
        let mut second = Optimizer::new(kind, groups.clone());
        second.load_state(&resumed, &loaded.tensors, loaded.metadata["steps"].parse().unwrap()).unwrap();
        assert_eq!(second.steps_taken(), 2);
        small_steps(&mut second, &mut resumed, 2..3);

        for (a, b) in straight.iter().zip(&resumed) {
            let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.value), bits(&b.value), "{kind:?}: {} differs after resuming", a.name);
        }
        assert_eq!(opt.state(&straight), second.state(&resumed), "{kind:?}: state after resuming");
    }
}

#[test]
fn load_state_rejects_state_that_does_not_fit() {
    let params = small_params();
    let groups = vec![ParamGroup { lr_scale: 1.0, weight_decay: 0.0 }; 2];
    let mut sgd_params = small_params();
    let mut sgd = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, groups.clone());
    set_grads(&mut sgd_params, 0);
    sgd.step(&mut sgd_params, 0.1, None);
    let (sgd_state, _) = sgd.state(&sgd_params);
    let mut adam_params = small_params();
    let mut adam = Optimizer::new(adam_kind(false), groups.clone());
    set_grads(&mut adam_params, 0);
    adam.step(&mut adam_params, 0.1, None);
    let (adam_state, _) = adam.state(&adam_params);
    assert_eq!(adam_state["a.step"].shape(), &[] as &[usize]);
    assert_eq!(adam_state["a.step"].data(), &[1.0]);

    let fails = |kind: OptimizerKind, state: &BTreeMap<String, Tensor>, needle: &str| {
        let mut opt = Optimizer::new(kind, groups.clone());
        let e = opt.load_state(&params, state, 1).expect_err("must not load").to_string();
        assert!(!e.contains('\n') && e.contains(needle), "{e}");
        assert_eq!(opt.steps_taken(), 0, "a failed load changes nothing");
    };
    fails(adam_kind(false), &sgd_state, "unexpected a.momentum_buffer");
    fails(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, &adam_state, "unexpected a.exp_avg");
    let mut wrong = sgd_state.clone();
    wrong.insert("a.momentum_buffer".into(), Tensor::zeros(&[4]));
    fails(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, &wrong, "a.momentum_buffer is [4], expected [5]");
    let mut unknown = sgd_state.clone();
    unknown.insert("layer9.weight.momentum_buffer".into(), Tensor::zeros(&[1]));
    fails(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, &unknown, "unexpected layer9.weight.momentum_buffer");
    let mut partial = adam_state.clone();
    partial.remove("fc.weight.exp_avg_sq");
    fails(adam_kind(false), &partial, "fc.weight lacks exp_avg_sq");
    let mut bad_step = adam_state.clone();
    bad_step.insert("a.step".into(), Tensor::full(&[], 1.5));
    fails(adam_kind(true), &bad_step, "a.step");

    let mut ok = Optimizer::new(adam_kind(true), groups.clone());
    ok.load_state(&params, &adam_state, 1).unwrap();
    assert_eq!(ok.state(&params), (adam_state, 1));
}

// ---------------------------------------------------------------------------------------------------------
// Schedules against torch.optim.lr_scheduler.
//
// Numbers printed by (torch 2.15):
//
// ```python
// import warnings; warnings.filterwarnings("ignore")
// import torch
// from torch.optim.lr_scheduler import StepLR, MultiStepLR, LinearLR, CosineAnnealingLR, SequentialLR, OneCycleLR
// def opt(): return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
// def per_epoch(make, epochs):
//     o = opt(); s = make(o); out = []
//     for _ in range(epochs): out.append(o.param_groups[0]["lr"]); o.step(); s.step()
//     return out
// print(per_epoch(lambda o: StepLR(o, step_size=3, gamma=0.1), 10))
// print(per_epoch(lambda o: MultiStepLR(o, milestones=[2, 5, 8], gamma=0.1), 10))
// o = opt()  # warm-up 2 epochs of 5 steps, 8 epochs in all, stepped per batch
// s = SequentialLR(o, [LinearLR(o, start_factor=0.01, total_iters=10),
//                      CosineAnnealingLR(o, T_max=30, eta_min=1e-4)], milestones=[10])
// cos = []
// for _ in range(40): cos.append(o.param_groups[0]["lr"]); o.step(); s.step()
// print({i: cos[i] for i in (0, 1, 5, 9, 10, 11, 20, 25, 39)})
// o = opt(); s = OneCycleLR(o, max_lr=0.1, total_steps=50)  # 5 epochs of 10 steps
// oc = []
// for _ in range(50): oc.append((o.param_groups[0]["lr"], o.param_groups[0]["momentum"])); o.step(); s.step()
// print({i: oc[i] for i in (0, 1, 7, 14, 15, 16, 30, 49)})
// ```

#[track_caller]
fn assert_lr(what: &str, got: f32, want: f64) {
    let e = ((got as f64 - want) / want).abs();
    assert!(e <= 1e-6, "{what}: {got} vs torch {want} (relative error {e:.2e})");
}

#[test]
fn step_and_multistep_change_once_per_epoch_like_torch() {
    let step_lr = [
        0.1,
        0.1,
        0.1,
        0.010000000000000002,
        0.010000000000000002,
        0.010000000000000002,
        0.0010000000000000002,
        0.0010000000000000002,
        0.0010000000000000002,
        0.00010000000000000003,
    ];
    let multistep = [
        0.1,
        0.1,
        0.010000000000000002,
        0.010000000000000002,
        0.010000000000000002,
        0.0010000000000000002,
        0.0010000000000000002,
        0.0010000000000000002,
        0.00010000000000000003,
        0.00010000000000000003,
    ];
    let s = Schedule::Step { step_size: 3, gamma: 0.1 };
    let m = Schedule::MultiStep { milestones: vec![2, 5, 8], gamma: 0.1 };
    let spe = 4;
    for epoch in 0..10u64 {
        for k in [0, 1, spe - 1] {
            let step = epoch * spe + k;
            assert_lr(&format!("StepLR step {step}"), s.lr(0.1, step, spe, 10), step_lr[epoch as usize]);
            assert_lr(&format!("MultiStepLR step {step}"), m.lr(0.1, step, spe, 10), multistep[epoch as usize]);
        }
    }
    assert_eq!(s.momentum(5, spe, 10), None);
    assert_eq!(Schedule::Constant.lr(0.1, 1000, spe, 10), 0.1);
}

#[test]
fn cosine_with_warmup_matches_linear_then_cosine_annealing() {
    let torch = [
        (0, 0.001),
        (1, 0.010899999999999998),
        (5, 0.05049999999999999),
        (9, 0.09009999999999996),
        (10, 0.1),
        (11, 0.09972636867364526),
        (20, 0.07502500000000002),
        (25, 0.050050000000000025),
        (39, 0.0003736313263547437),
    ];
    let s = Schedule::Cosine { warmup_epochs: 2, warmup_start_factor: 0.01, min_lr: 1e-4 };
    for (step, want) in torch {
        assert_lr(&format!("cosine step {step}"), s.lr(0.1, step, 5, 8), want);
    }
    // After the last step it stays at min_lr; without warm-up it starts at the base lr.
    assert_lr("cosine at the end", s.lr(0.1, 40, 5, 8), 1e-4);
    assert_lr("cosine past the end", s.lr(0.1, 400, 5, 8), 1e-4);
    let plain = Schedule::Cosine { warmup_epochs: 0, warmup_start_factor: 0.01, min_lr: 0.0 };
    assert_lr("no warm-up", plain.lr(0.1, 0, 5, 8), 0.1);
}

#[test]
fn one_cycle_lr_and_momentum_match_torch() {
    let torch = [
        (0, 0.0040000000000000036, 0.95),
        (1, 0.0052034602152724735, 0.9487463956090911),
        (7, 0.052000000000000005, 0.8999999999999999),
        (14, 0.1, 0.85),
        (15, 0.09979871550490317, 0.850201285300238),
        (16, 0.09919648264401378, 0.8508035205700685),
        (30, 0.05671183644422961, 0.8932883367091172),
        (49, 4e-07, 0.95),
    ];
    let s = Schedule::OneCycle {
        pct_start: 0.3,
        div_factor: 25.0,
        final_div_factor: 1e4,
        max_momentum: 0.95,
        base_momentum: 0.85,
    };
    for (step, lr, momentum) in torch {
        assert_lr(&format!("one-cycle lr at {step}"), s.lr(0.1, step, 10, 5), lr);
        let m = s.momentum(step, 10, 5).expect("one-cycle cycles momentum");
        assert_lr(&format!("one-cycle momentum at {step}"), m, momentum);
    }
}
