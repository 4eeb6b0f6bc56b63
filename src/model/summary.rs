//! What `resnet info` prints: per-stage output shapes, parameter counts and multiply-accumulates, worked out from
//! the graph alone (no weights are allocated, so ResNet-152 is as quick as ResNet-18).

use super::family::ResNetConfig;
use super::graph::Graph;

pub struct Row {
    pub name: String,
    pub blocks: usize,
    /// Output (channels, height, width).
    pub out: (usize, usize, usize),
    pub params: usize,
    pub macs: u64,
}

pub struct Summary {
    pub rows: Vec<Row>,
    pub params: usize,
    pub macs: u64,
}

impl Summary {
    /// fp32 weights in MiB (parameters only, as a checkpoint without optimiser state holds them).
    pub fn fp32_mib(&self) -> f64 {
        self.params as f64 * 4.0 / (1024.0 * 1024.0)
    }
}

pub fn summarize(cfg: &ResNetConfig, size: usize) -> Summary {
    let g = Graph::of(cfg);
    let shapes = g.shapes(size, size);
    // Multiply-accumulates of unit u: one per weight per output position.
    let macs = |u: usize| {
        let (unit, [co, oh, ow]) = (&g.units[u], shapes.units[u]);
        (oh * ow * co * unit.in_channels * unit.kernel * unit.kernel) as u64
    };
    let [c0, h0, w0] = shapes.pool.unwrap_or(shapes.units[0]);
    let mut rows =
        vec![Row { name: "stem".into(), blocks: 0, out: (c0, h0, w0), params: g.units[0].num_params(), macs: macs(0) }];
    for (i, stage) in g.stages.iter().enumerate() {
        let units: Vec<usize> =
            g.blocks[stage.clone()].iter().flat_map(|b| b.main.iter().copied().chain(b.downsample)).collect();
        let [c, h, w] = shapes.units[g.stage_output(i)];
        rows.push(Row {
            name: format!("layer{}", i + 1),
            blocks: stage.len(),
            out: (c, h, w),
            params: units.iter().map(|&u| g.units[u].num_params()).sum(),
            macs: units.iter().map(|&u| macs(u)).sum(),
        });
    }
    rows.push(Row {
        name: "avgpool+fc".into(),
        blocks: 0,
        out: (g.classes, 1, 1),
        params: g.features * g.classes + g.classes,
        macs: (g.features * g.classes) as u64,
    });
    let params = rows.iter().map(|r| r.params).sum();
    let macs = rows.iter().map(|r| r.macs).sum();
    Summary { rows, params, macs }
}
