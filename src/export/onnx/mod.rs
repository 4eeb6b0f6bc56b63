//! The network as an ONNX model: one more walk over `model::Graph`, emitting the nodes torchvision's
//! `torch.onnx.export` would (Conv, BatchNormalization or none, Relu, Add, MaxPool, GlobalAveragePool, Flatten,
//! Gemm) under torchvision's names, so that ONNX Runtime, TensorRT and OpenVINO run a model trained here.
//!
//! Choices: opset 17 (IR version 8; ONNX Runtime has run it since 1.12, TensorRT since 8.6); the batch axis is
//! dynamic (`batch`), height and width fixed at the model card's crop so that builders can plan for one shape;
//! batch norm folded into the convolution before it by default (w·γ/√(σ²+ε), β − μ·γ/√(σ²+ε), computed in f64),
//! as ONNX Runtime's own graph optimiser would do at load time, so that the file is the deployable graph; `keep_bn`
//! emits BatchNormalization nodes instead (for fine-tuning elsewhere). The model card (arch, stem, preprocessing,
//! class names) rides in `metadata_props`, which ONNX Runtime hands out as `custom_metadata_map`.
//! The protobuf types are generated once from ONNX's `onnx.proto` (`tools/onnx-proto`), encoded by `prost`.

#[rustfmt::skip]
pub mod proto;

use std::collections::BTreeMap;

use prost::Message;

use crate::engine::Tensor;
use crate::error::{Error, Result};
use crate::infer::card::ModelCard;
use crate::model::graph::{Post, Src};
use crate::model::layers::BN_EPS;
use crate::model::{ResNet, Tap};
use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType,
    tensor_shape_proto::Dimension, tensor_shape_proto::dimension::Value as Dim, type_proto,
};

/// The operator set the nodes are written against, and the IR version that goes with it.
pub const OPSET: i64 = 17;
const IR_VERSION: i64 = 8;

/// The graph's input and output names.
pub const INPUT: &str = "input";

/// What the exported graph computes.
#[derive(Clone, Copy, Debug)]
pub struct OnnxOptions {
    /// Where the graph ends: the logits (`Fc`), the pooled features (`AvgPool`), or a stage spatially averaged.
    pub tap: Tap,
    /// Emit BatchNormalization nodes instead of folding them into the convolutions.
    pub keep_bn: bool,
}

/// The name of the graph's output for `tap`.
pub fn output_name(tap: Tap) -> &'static str {
    if tap == Tap::Fc { "logits" } else { "features" }
}

/// The ONNX model's bytes.
pub fn encode(model: &ResNet, card: &ModelCard, options: OnnxOptions) -> Result<Vec<u8>> {
    Ok(build(model, card, options)?.encode_to_vec())
}

/// The ONNX model of `model` with `card`'s input size and metadata.
pub fn build(model: &ResNet, card: &ModelCard, options: OnnxOptions) -> Result<ModelProto> {
    let state = model.state_dict();
    let get = |key: &str| state.get(key).ok_or_else(|| Error::invalid(format!("the network has no tensor {key}")));
    let graph = &model.graph;
    let mut g = Builder::default();
    let value = |src: Src| match src {
        Src::Images => INPUT.to_string(),
        Src::Pool => "maxpool".to_string(),
        Src::Unit(i) => unit_output(graph, i),
    };
    // The last unit the graph needs: a stage's output, or the last unit for the pooled features and the logits.
    let last = match options.tap.stage() {
        Some(s) => graph.blocks[graph.stages[s].end - 1].output(),
        None => graph.units.len() - 1,
    };
    for (i, unit) in graph.units.iter().enumerate().take(last + 1) {
        let conv_w = get(&format!("{}.weight", unit.conv))?;
        let bn = |p: &str| get(&format!("{}.{p}", unit.bn));
        let (gamma, beta, mean, var) = (bn("weight")?, bn("bias")?, bn("running_mean")?, bn("running_var")?);
        let conv_out = if options.keep_bn { unit.conv.clone() } else { unit.bn.clone() };
        let mut conv_inputs = vec![value(unit.src), format!("{}.weight", unit.conv)];
        if options.keep_bn {
            g.initializer(&format!("{}.weight", unit.conv), conv_w);
        } else {
            let (w, b) = fold(conv_w, gamma, beta, mean, var)?;
            g.initializer(&format!("{}.weight", unit.conv), &w);
            g.initializer(&format!("{}.bias", unit.conv), &b);
            conv_inputs.push(format!("{}.bias", unit.conv));
        }
        let (k, s, p) = (unit.kernel as i64, unit.stride as i64, unit.padding as i64);
        g.node(
            "Conv",
            &unit.conv,
            conv_inputs,
            &conv_out,
            vec![ints("kernel_shape", &[k, k]), ints("strides", &[s, s]), ints("pads", &[p, p, p, p])],
        );
        if options.keep_bn {
            let inputs = ["weight", "bias", "running_mean", "running_var"].map(|p| format!("{}.{p}", unit.bn));
            for (name, t) in inputs.iter().zip([gamma, beta, mean, var]) {
                g.initializer(name, t);
            }
            let inputs = std::iter::once(conv_out.clone()).chain(inputs).collect();
            g.node("BatchNormalization", &unit.bn, inputs, &unit.bn, vec![float("epsilon", BN_EPS)]);
        }
        let out = unit_output(graph, i);
        match unit.post {
            Post::Linear => {}
            Post::Relu => g.node("Relu", &out, vec![unit.bn.clone()], &out, vec![]),
            Post::AddRelu(shortcut) => {
                let sum = format!("{}.add", unit.bn);
                g.node("Add", &sum, vec![unit.bn.clone(), value(shortcut)], &sum, vec![]);
                g.node("Relu", &out, vec![sum], &out, vec![]);
            }
        }
        if i == 0
            && let Some(pool) = graph.pool
        {
            let (k, s, p) = (pool.kernel as i64, pool.stride as i64, pool.padding as i64);
            let attrs = vec![ints("kernel_shape", &[k, k]), ints("strides", &[s, s]), ints("pads", &[p, p, p, p])];
            g.node("MaxPool", "maxpool", vec![out], "maxpool", attrs);
        }
    }
    let output = output_name(options.tap);
    let pooled_name = if options.tap == Tap::Fc { "flatten" } else { output };
    g.node("GlobalAveragePool", "avgpool", vec![unit_output(graph, last)], "avgpool", vec![]);
    g.node("Flatten", "flatten", vec!["avgpool".into()], pooled_name, vec![int("axis", 1)]);
    let width = if options.tap == Tap::Fc {
        g.initializer("fc.weight", get("fc.weight")?);
        g.initializer("fc.bias", get("fc.bias")?);
        let inputs = vec![pooled_name.to_string(), "fc.weight".into(), "fc.bias".into()];
        g.node("Gemm", "fc", inputs, output, vec![int("transB", 1)]);
        graph.classes
    } else {
        graph.units[last].out_channels
    };

    let size = i64::from(card.preprocess.size);
    let channels = graph.in_channels as i64;
    let batch = || Dimension { value: Some(Dim::DimParam("batch".into())), ..Default::default() };
    let fixed = |n: i64| Dimension { value: Some(Dim::DimValue(n)), ..Default::default() };
    let input = value_info(INPUT, vec![batch(), fixed(channels), fixed(size), fixed(size)]);
    let output_info = value_info(output, vec![batch(), fixed(width as i64)]);
    let mut metadata = card.to_metadata()?;
    metadata.insert("output".into(), output.into());
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
        producer_name: Some("resnet-rs".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!("{} ({} stem), {}", card.arch, card.stem, describe(options))),
        graph: Some(GraphProto {
            name: Some(card.arch.to_string()),
            node: g.nodes,
            initializer: g.initializers,
            input: vec![input],
            output: vec![output_info],
            ..Default::default()
        }),
        metadata_props: metadata_props(metadata),
        ..Default::default()
    })
}

fn describe(options: OnnxOptions) -> String {
    let bn = if options.keep_bn { "batch norm kept" } else { "batch norm folded into the convolutions" };
    format!("output {} ({:?}), {bn}", output_name(options.tap), options.tap)
}

/// The value a unit hands on: after its ReLU, or its batch norm for a projection.
fn unit_output(graph: &crate::model::Graph, i: usize) -> String {
    let unit = &graph.units[i];
    match unit.post {
        Post::Linear => unit.bn.clone(),
        _ => format!("{}.relu", unit.bn),
    }
}

/// Batch norm folded into the convolution before it: `[out, in, k, k]` weights scaled per output channel and
/// the bias the normalisation's shift becomes.
fn fold(w: &Tensor, gamma: &Tensor, beta: &Tensor, mean: &Tensor, var: &Tensor) -> Result<(Tensor, Tensor)> {
    let out = w.shape()[0];
    let per = w.numel() / out.max(1);
    let mut weights = w.data().to_vec();
    let mut bias = vec![0f32; out];
    for o in 0..out {
        let scale = f64::from(gamma.data()[o]) / (f64::from(var.data()[o]) + f64::from(BN_EPS)).sqrt();
        for v in &mut weights[o * per..(o + 1) * per] {
            *v = (f64::from(*v) * scale) as f32;
        }
        bias[o] = (f64::from(beta.data()[o]) - f64::from(mean.data()[o]) * scale) as f32;
    }
    Ok((Tensor::new(w.shape(), weights)?, Tensor::new(&[out], bias)?))
}

#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl Builder {
    fn node(&mut self, op: &str, name: &str, inputs: Vec<String>, output: &str, attribute: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs,
            output: vec![output.into()],
            attribute,
            ..Default::default()
        });
    }

    fn initializer(&mut self, name: &str, t: &Tensor) {
        let dims = t.shape().iter().map(|&d| d as i64).collect();
        self.initializers.push(TensorProto {
            name: Some(name.into()),
            dims,
            data_type: Some(DataType::Float as i32),
            raw_data: Some(t.data().iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
    }
}

fn value_info(name: &str, dims: Vec<Dimension>) -> ValueInfoProto {
    let tensor =
        type_proto::Tensor { elem_type: Some(DataType::Float as i32), shape: Some(TensorShapeProto { dim: dims }) };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() }),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

fn metadata_props(m: BTreeMap<String, String>) -> Vec<StringStringEntryProto> {
    m.into_iter().map(|(k, v)| StringStringEntryProto { key: Some(k), value: Some(v) }).collect()
}
