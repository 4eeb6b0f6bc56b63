//! Training convolutions: the forward plan of `conv.rs` (descriptors, forward algorithm, FMA math unless TF32 is
//! allowed) plus the two backward passes, backward data (dx) and backward filter (dw), each with its algorithm
//! found once per shape by cuDNN's timed search and cached, like the forward's.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};

use cudarc::cudnn::sys;

use super::super::conv::{AlgoCache, AlgoPerf, ConvPlan, ConvShape, Storage};
use super::super::device::{Buf, Device, cuda_err};
use super::half::ActRef;
use crate::error::{Error, Result};

fn data_algo(v: u32) -> Option<sys::cudnnConvolutionBwdDataAlgo_t> {
    use sys::cudnnConvolutionBwdDataAlgo_t::*;
    Some(match v {
        0 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        1 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        2 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        3 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        4 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        5 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
        _ => return None,
    })
}

fn filter_algo(v: u32) -> Option<sys::cudnnConvolutionBwdFilterAlgo_t> {
    use sys::cudnnConvolutionBwdFilterAlgo_t::*;
    Some(match v {
        0 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        1 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        2 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        3 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        4 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        5 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        6 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        _ => return None,
    })
}

type DataChoice = (sys::cudnnConvolutionBwdDataAlgo_t, usize);
type FilterChoice = (sys::cudnnConvolutionBwdFilterAlgo_t, usize);

/// What a backward algorithm is cached by: the shape, TF32 permission and storage.
type AlgoKey = (ConvShape, bool, Storage);

/// Chosen algorithms by shape, TF32 permission and storage: the forward's (conv.rs's cache) and both backward
/// passes'.
#[derive(Default)]
pub struct TrainAlgos {
    forward: AlgoCache,
    data: HashMap<AlgoKey, DataChoice>,
    filter: HashMap<AlgoKey, FilterChoice>,
}

/// The fastest successful result that respects the precision setting, as (algorithm value, workspace bytes):
/// tensor-op algorithms only with TF32 allowed or on bf16 storage (where they are the point).
fn pick(tensor_ops: bool, perf: &[AlgoPerf], returned: c_int) -> Option<(u32, usize)> {
    let returned = usize::try_from(returned).unwrap_or(0).min(perf.len());
    const SUCCESS: u32 = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS as u32;
    let tensor_op = [
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH as u32,
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION as u32,
    ];
    perf[..returned]
        .iter()
        .find(|p| p.status == SUCCESS && (tensor_ops || !tensor_op.contains(&p.math_type)))
        .map(|p| (p.algo, p.memory))
}

/// The algorithm of one backward pass for `shape`: cached, or found by cuDNN's timed search (`find` fills up to
/// `count` results and the number returned) and then cached; with the workspace these descriptors need for it
/// (`size`), which may exceed the search's own report.
fn choose<A: Copy>(
    dev: &Device,
    cache: &mut HashMap<AlgoKey, (A, usize)>,
    (shape, storage, count, pass): (ConvShape, Storage, usize, &str),
    algo_of: fn(u32) -> Option<A>,
    find: impl FnOnce(&mut [AlgoPerf], &mut c_int) -> sys::cudnnStatus_t,
    size: impl FnOnce(A, &mut usize) -> sys::cudnnStatus_t,
) -> Result<(A, usize)> {
    let key = (shape, dev.allow_tf32, storage);
    let (algo, searched) = match cache.get(&key) {
        Some(&hit) => hit,
        None => {
            let mut perf = [AlgoPerf::default(); 8];
            let mut returned: c_int = 0;
            find(&mut perf[..count], &mut returned).result().map_err(cuda_err("searching convolution algorithms"))?;
            let tensor_ops = dev.allow_tf32 || storage == Storage::Bf16Nhwc;
            let chosen = pick(tensor_ops, &perf[..count], returned)
                .and_then(|(a, m)| Some((algo_of(a)?, m)))
                .ok_or_else(|| Error::invalid(format!("CUDA: cuDNN has no usable {pass} algorithm for {shape:?}")))?;
            cache.insert(key, chosen);
            chosen
        }
    };
    let mut asked = 0usize;
    size(algo, &mut asked).result().map_err(cuda_err("sizing a convolution workspace"))?;
    Ok((algo, searched.max(asked)))
}

/// One training convolution at one batch size: forward plan and both backward algorithms.
pub struct TrainConv {
    fwd: ConvPlan,
    /// None for the stem, whose input (the images) needs no gradient.
    data: Option<DataChoice>,
    filter: FilterChoice,
    /// Bytes of workspace the largest of the three passes needs.
    pub workspace: usize,
}

impl TrainConv {
    /// `storage`: fp32 NCHW, or bf16 NHWC with fp32 accumulation (x, w, y and their gradients all bf16: cuDNN's
    /// legacy API runs bf16 convolutions only with every tensor bf16, compute type FLOAT).
    pub fn new(dev: &Device, algos: &mut TrainAlgos, shape: ConvShape, need_dx: bool, storage: Storage) -> Result<TrainConv> {
        let fwd = ConvPlan::new(dev, &mut algos.forward, shape, storage)?;
        let (h, x, w, conv, y) = (dev.dnn.raw(), fwd.x.0, fwd.w.0, fwd.conv.0, fwd.y.0);
        let data = if need_dx {
            // CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT results at most.
            let spec = (shape, storage, 6, "backward-data");
            // SAFETY (both closures): the handle and the plan's descriptors are live and fully set, passed in the
            // order cudnnFindConvolutionBackwardDataAlgorithm and cudnnGetConvolutionBackwardDataWorkspaceSize take
            // them (w, dy = the forward's y, the convolution, dx = the forward's x); `perf` has room for the
            // requested count, laid out as cudnnConvolutionBwdDataAlgoPerf_t (asserted in cuda/conv.rs); cuDNN allocates its
            // own trial buffers; the algorithm passed to the size query came from cuDNN.
            let find = |perf: &mut [AlgoPerf], n: &mut c_int| unsafe {
                sys::cudnnFindConvolutionBackwardDataAlgorithm(h, w, y, conv, x, perf.len() as c_int, n, perf.as_mut_ptr().cast())
            };
            let size = |a, bytes: &mut usize| unsafe {
                sys::cudnnGetConvolutionBackwardDataWorkspaceSize(h, w, y, conv, x, a, bytes)
            };
            Some(choose(dev, &mut algos.data, spec, data_algo, find, size)?)
        } else {
            None
        };
        // CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT results at most.
        let spec = (shape, storage, 7, "backward-filter");
        // SAFETY (both closures): as above, in the order of cudnnFindConvolutionBackwardFilterAlgorithm and
        // cudnnGetConvolutionBackwardFilterWorkspaceSize (x, dy, the convolution, dw = the forward's w), with room
        // for the requested count of cudnnConvolutionBwdFilterAlgoPerf_t.
        let find = |perf: &mut [AlgoPerf], n: &mut c_int| unsafe {
            sys::cudnnFindConvolutionBackwardFilterAlgorithm(h, x, y, conv, w, perf.len() as c_int, n, perf.as_mut_ptr().cast())
        };
        let size = |a, bytes: &mut usize| unsafe {
            sys::cudnnGetConvolutionBackwardFilterWorkspaceSize(h, x, y, conv, w, a, bytes)
        };
        let filter = choose(dev, &mut algos.filter, spec, filter_algo, find, size)?;
        let workspace = fwd.workspace.max(filter.1).max(data.map_or(0, |d| d.1));
        Ok(TrainConv {
            fwd,
            data,
            filter,
            workspace,
        })
    }

    pub fn shape(&self) -> ConvShape {
        self.fwd.shape
    }

    /// The cuDNN descriptor of the output `[N, O, OH, OW]`, which batch norm describes its tensors with.
    pub fn y_desc(&self) -> sys::cudnnTensorDescriptor_t {
        self.fwd.y.0
    }

    /// y = conv(x, w), all three of the plan's storage.
    pub fn forward(&self, dev: &Device, x: ActRef, w: ActRef, y: ActRef, ws: &Buf<u8>) -> Result<()> {
        match (x, w, y) {
            (ActRef::F32(x), ActRef::F32(w), ActRef::F32(y)) => self.fwd.forward(dev, x, w, y, ws),
            (ActRef::Bf16(x), ActRef::Bf16(w), ActRef::Bf16(y)) => self.fwd.forward(dev, x, w, y, ws),
            _ => Err(super::half::mixed("a convolution")),
        }
    }

    /// The buffers of a backward pass: all of the plan's storage (which fixes the element size cuDNN assumes) and
    /// at least as long as the shape needs.
    fn check(&self, x: ActRef, w: ActRef, dy: ActRef, ws: &Buf<u8>) -> Result<()> {
        let s = self.fwd.shape;
        if [x, w, dy].iter().any(|b| b.storage() != self.fwd.storage()) {
            return Err(super::half::mixed("a convolution backward"));
        }
        let need_x: usize = s.x.iter().product();
        let need_y: usize = s.y().iter().product();
        if x.len() < need_x || w.len() < s.weight_len() || dy.len() < need_y || ws.len < self.workspace {
            return Err(Error::invalid(format!("CUDA: buffers too small for convolution backward {s:?}")));
        }
        Ok(())
    }

    /// dx = beta·dx + conv_backward_data(w, dy): beta 1 accumulates (the residual gradient of an identity
    /// shortcut or of a projection already there), beta 0 overwrites.
    pub fn backward_data(
        &self,
        dev: &Device,
        w: ActRef,
        dy: ActRef,
        dx: ActRef,
        accumulate: bool,
        ws: &Buf<u8>,
    ) -> Result<()> {
        let (algo, _) = self
            .data
            .ok_or_else(|| Error::invalid("CUDA: this convolution was planned without an input gradient"))?;
        self.check(dx, w, dy, ws)?;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: the descriptors describe w, dy and dx in the plan's storage (fp32 NCHW, or bf16 NHWC/OHWI), and
        // the buffers' storage and sizes were checked against them;
        // dy and dx are distinct allocations (the trainer's gradient scratch buffers, never the same one for both);
        // the workspace holds at least the bytes cuDNN asked for; alpha/beta are host f32s (cuDNN's scaling type
        // for float and bf16 data alike); the
        // argument order is cudnnConvolutionBackwardData's (handle, alpha, wDesc, w, dyDesc, dy, convDesc, algo,
        // workspace, size, beta, dxDesc, dx); all work is on the handle's stream.
        unsafe {
            sys::cudnnConvolutionBackwardData(
                dev.dnn.raw(),
                &alpha as *const f32 as *const c_void,
                self.fwd.w.0,
                w.ptr() as *const c_void,
                self.fwd.y.0,
                dy.ptr() as *const c_void,
                self.fwd.conv.0,
                algo,
                ws.ptr as *mut c_void,
                self.workspace,
                &beta as *const f32 as *const c_void,
                self.fwd.x.0,
                dx.ptr() as *mut c_void,
            )
        }
        .result()
        .map_err(cuda_err("convolution backward data"))
    }

    /// dw = conv_backward_filter(x, dy), overwriting dw (in the plan's storage: bf16 OHWI for bf16).
    pub fn backward_filter(
        &self,
        dev: &Device,
        x: ActRef,
        dy: ActRef,
        dw: ActRef,
        ws: &Buf<u8>,
    ) -> Result<()> {
        self.check(x, dw, dy, ws)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: as for backward data, with cudnnConvolutionBackwardFilter's order (handle, alpha, xDesc, x,
        // dyDesc, dy, convDesc, algo, workspace, size, beta, dwDesc, dw); dw is the parameter's own gradient
        // buffer, distinct from x and dy.
        unsafe {
            sys::cudnnConvolutionBackwardFilter(
                dev.dnn.raw(),
                &alpha as *const f32 as *const c_void,
                self.fwd.x.0,
                x.ptr() as *const c_void,
                self.fwd.y.0,
                dy.ptr() as *const c_void,
                self.fwd.conv.0,
                self.filter.0,
                ws.ptr as *mut c_void,
                self.workspace,
                &beta as *const f32 as *const c_void,
                self.fwd.w.0,
                dw.ptr() as *mut c_void,
            )
        }
        .result()
        .map_err(cuda_err("convolution backward filter"))
    }
}
