//! What `resnet info` prints: per-stage output shapes, parameter counts and multiply-accumulates, worked out from
//! the configuration alone (no weights are allocated, so ResNet-152 is as quick as ResNet-18).

use super::family::{ResNetConfig, Stem};

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

/// A conv + BN unit: (params, macs, output h, output w).
fn conv_bn(cin: usize, cout: usize, k: usize, stride: usize, h: usize, w: usize) -> (usize, u64, usize, usize) {
    let pad = k / 2;
    let oh = (h + 2 * pad).saturating_sub(k) / stride + 1;
    let ow = (w + 2 * pad).saturating_sub(k) / stride + 1;
    let params = cout * cin * k * k + 2 * cout;
    (params, (oh * ow * cout * cin * k * k) as u64, oh, ow)
}

pub fn summarize(cfg: &ResNetConfig, size: usize) -> Summary {
    let mut rows = Vec::new();
    let c0 = cfg.widths[0];
    let (k, s) = match cfg.stem {
        Stem::ImageNet => (7, 2),
        Stem::Cifar => (3, 1),
    };
    let (params, macs, mut h, mut w) = conv_bn(3, c0, k, s, size, size);
    if cfg.stem == Stem::ImageNet {
        h = (h + 2 - 3) / 2 + 1;
        w = (w + 2 - 3) / 2 + 1;
    }
    rows.push(Row { name: "stem".into(), blocks: 0, out: (c0, h, w), params, macs });
    let kind = cfg.arch.block;
    let mut cin = c0;
    for (i, (&width, &depth)) in cfg.widths.iter().zip(&cfg.arch.layers).enumerate() {
        let cout = width * kind.expansion();
        let (mut params, mut macs) = (0, 0);
        for b in 0..depth {
            let stride = if i > 0 && b == 0 { 2 } else { 1 };
            let units: Vec<(usize, usize, usize, usize)> = match kind {
                super::BlockKind::Basic => vec![(cin, width, 3, stride), (width, width, 3, 1)],
                super::BlockKind::Bottleneck => {
                    vec![(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
                }
            };
            let (h0, w0) = (h, w);
            for (ci, co, k, s) in units {
                let (p, m, oh, ow) = conv_bn(ci, co, k, s, h, w);
                params += p;
                macs += m;
                (h, w) = (oh, ow);
            }
            if stride != 1 || cin != cout {
                let (p, m, _, _) = conv_bn(cin, cout, 1, stride, h0, w0);
                params += p;
                macs += m;
            }
            cin = cout;
        }
        rows.push(Row { name: format!("layer{}", i + 1), blocks: depth, out: (cout, h, w), params, macs });
    }
    let fc_params = cin * cfg.num_classes + cfg.num_classes;
    rows.push(Row {
        name: "avgpool+fc".into(),
        blocks: 0,
        out: (cfg.num_classes, 1, 1),
        params: fc_params,
        macs: (cin * cfg.num_classes) as u64,
    });
    let params = rows.iter().map(|r| r.params).sum();
    let macs = rows.iter().map(|r| r.macs).sum();
    Summary { rows, params, macs }
}
