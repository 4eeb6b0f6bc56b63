//! Training convolutions: the forward plan of `conv.rs` (descriptors, forward algorithm, FMA math unless TF32 is
//! allowed) plus the two backward passes, backward data (dx) and backward filter (dw), each with its algorithm
//! found once per shape by cuDNN's timed search and cached, like the forward's.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};

use cudarc::cudnn::sys;

use super::super::conv::{AlgoCache, AlgoPerf, ConvPlan, ConvShape, Storage, usable};
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

/// A backward pass's algorithm, its workspace bytes and the math type cuDNN's search ran it with.
type DataChoice = (sys::cudnnConvolutionBwdDataAlgo_t, usize, u32);
type FilterChoice = (sys::cudnnConvolutionBwdFilterAlgo_t, usize, u32);

const TENSOR_OP: u32 = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH as u32;

/// Put `math` (a `cudnnMathType_t` as cuDNN reported it) on a convolution descriptor. bf16 descriptors carry
/// tensor-op math for the searches and the forward; cuDNN's search tries algorithms that have no tensor-op variant
/// with default math and reports them so, and such an algorithm must run with the math type it was found with
/// (a descriptor that disagrees is refused or, as other frameworks found, can compute NaNs).
fn set_math(conv: sys::cudnnConvolutionDescriptor_t, math: u32) -> Result<()> {
    use sys::cudnnMathType_t::*;
    let math = match math {
        0 => CUDNN_DEFAULT_MATH,
        2 => CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        3 => CUDNN_FMA_MATH,
        _ => CUDNN_TENSOR_OP_MATH,
    };
    // SAFETY: `conv` is a live descriptor owned by the caller's plan; the call only stores the math type, which
    // cuDNN reads when the next call that takes the descriptor is made (on this thread, in program order).
    unsafe { cudarc::cudnn::result::set_convolution_math_type(conv, math) }
        .map_err(cuda_err("setting a convolution's math type"))
}

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

/// The fastest successful result that respects the precision setting, as (algorithm value, workspace bytes, math
/// type): tensor-op algorithms only with TF32 allowed or on bf16 storage (where they are the point).
fn pick(tensor_ops: bool, perf: &[AlgoPerf], returned: c_int) -> Option<(u32, usize, u32)> {
    usable(tensor_ops, perf, returned).next().map(|p| (p.algo, p.memory, p.math_type))
}

/// The algorithm of one backward pass for `shape`: cached, or found by cuDNN's timed search (`find` fills up to
/// `count` results and the number returned) and then cached; with the workspace these descriptors need for it
/// (`size`), which may exceed the search's own report. With bf16 storage the convolution descriptor `conv` carries
/// tensor-op math for the search and the chosen algorithm's math type for the size query.
#[allow(clippy::too_many_arguments)]
fn choose<A: Copy>(
    dev: &Device,
    cache: &mut HashMap<AlgoKey, (A, usize, u32)>,
    (shape, storage, count, pass): (ConvShape, Storage, usize, &str),
    conv: sys::cudnnConvolutionDescriptor_t,
    algo_of: fn(u32) -> Option<A>,
    find: impl FnOnce(&mut [AlgoPerf], &mut c_int) -> sys::cudnnStatus_t,
    size: impl FnOnce(A, &mut usize) -> sys::cudnnStatus_t,
) -> Result<(A, usize, u32)> {
    let bf16 = storage == Storage::Bf16Nhwc;
    let key = (shape, dev.allow_tf32, storage);
    let (algo, searched, math) = match cache.get(&key) {
        Some(&hit) => hit,
        None => {
            if bf16 {
                set_math(conv, TENSOR_OP)?;
            }
            let mut perf = [AlgoPerf::default(); 8];
            let mut returned: c_int = 0;
            find(&mut perf[..count], &mut returned).result().map_err(cuda_err("searching convolution algorithms"))?;
            let chosen = pick(dev.allow_tf32 || bf16, &perf[..count], returned)
                .and_then(|(a, m, math)| Some((algo_of(a)?, m, math)))
                .ok_or_else(|| Error::invalid(format!("CUDA: cuDNN has no usable {pass} algorithm for {shape:?}")))?;
            cache.insert(key, chosen);
            chosen
        }
    };
    if bf16 {
        set_math(conv, math)?;
    }
    let mut asked = 0usize;
    size(algo, &mut asked).result().map_err(cuda_err("sizing a convolution workspace"))?;
    if bf16 {
        set_math(conv, TENSOR_OP)?;
    }
    Ok((algo, searched.max(asked), math))
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
    pub fn new(
        dev: &Device,
        algos: &mut TrainAlgos,
        shape: ConvShape,
        need_dx: bool,
        storage: Storage,
    ) -> Result<TrainConv> {
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
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    h,
                    w,
                    y,
                    conv,
                    x,
                    perf.len() as c_int,
                    n,
                    perf.as_mut_ptr().cast(),
                )
            };
            let size = |a, bytes: &mut usize| unsafe {
                sys::cudnnGetConvolutionBackwardDataWorkspaceSize(h, w, y, conv, x, a, bytes)
            };
            Some(choose(dev, &mut algos.data, spec, conv, data_algo, find, size)?)
        } else {
            None
        };
        // CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT results at most.
        let spec = (shape, storage, 7, "backward-filter");
        // SAFETY (both closures): as above, in the order of cudnnFindConvolutionBackwardFilterAlgorithm and
        // cudnnGetConvolutionBackwardFilterWorkspaceSize (x, dy, the convolution, dw = the forward's w), with room
        // for the requested count of cudnnConvolutionBwdFilterAlgoPerf_t.
        let find = |perf: &mut [AlgoPerf], n: &mut c_int| unsafe {
            sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                h,
                x,
                y,
                conv,
                w,
                perf.len() as c_int,
                n,
                perf.as_mut_ptr().cast(),
            )
        };
        let size = |a, bytes: &mut usize| unsafe {
            sys::cudnnGetConvolutionBackwardFilterWorkspaceSize(h, x, y, conv, w, a, bytes)
        };
        let filter = choose(dev, &mut algos.filter, spec, conv, filter_algo, find, size)?;
        let workspace = fwd.workspace.max(filter.1).max(data.map_or(0, |d| d.1));
        Ok(TrainConv { fwd, data, filter, workspace })
    }

    pub fn shape(&self) -> ConvShape {
        self.fwd.shape
    }

    /// The cuDNN descriptor of the output `[N, O, OH, OW]`, which batch norm describes its tensors with.
    pub fn y_desc(&self) -> sys::cudnnTensorDescriptor_t {
        self.fwd.y.0
    }

    /// With bf16 storage, put `math` on the convolution descriptor before a call (each pass runs with the math
    /// type its algorithm was found with; the forward's is tensor-op, as its plan was built). fp32 descriptors are
    /// never touched.
    fn use_math(&self, math: u32) -> Result<()> {
        if self.fwd.storage() == Storage::Bf16Nhwc { set_math(self.fwd.conv.0, math) } else { Ok(()) }
    }

    /// y = conv(x, w), all three of the plan's storage.
    pub fn forward(&self, dev: &Device, x: ActRef, w: ActRef, y: ActRef, ws: &Buf<u8>) -> Result<()> {
        self.use_math(TENSOR_OP)?;
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
        let (algo, _, math) =
            self.data.expect("backward_data runs only on convolutions planned with an input gradient");
        self.check(dx, w, dy, ws)?;
        self.use_math(math)?;
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
    pub fn backward_filter(&self, dev: &Device, x: ActRef, dy: ActRef, dw: ActRef, ws: &Buf<u8>) -> Result<()> {
        self.check(x, dw, dy, ws)?;
        self.use_math(self.filter.2)?;
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
