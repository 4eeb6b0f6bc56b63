//! cuDNN convolutions: the handle, RAII descriptors, and the forward algorithm chosen once per shape.
//!
//! The algorithm is measured with `cudnnFindConvolutionForwardAlgorithm` the first time a shape is seen and cached
//! by shape (and precision), so plans for other batch sizes or a second network reuse the search. With TF32 off the
//! descriptor carries CUDNN_FMA_MATH and keeps it whatever the search reports, so no tensor-core fp32 algorithm can
//! run; results that report tensor-op math are skipped as well.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

use cudarc::cudnn::result as dnn;
use cudarc::cudnn::sys;
use cudarc::driver::CudaStream;

use super::device::{Buf, Device, cuda_err};
use crate::engine::ConvGeom;
use crate::error::{Error, Result};

/// A cuDNN handle bound to the device's stream. It holds the stream so that the stream outlives the handle.
pub struct DnnHandle {
    raw: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
}

impl DnnHandle {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let version = dnn::get_version();
        if version < 90000 {
            return Err(Error::invalid(format!(
                "CUDA: cuDNN {version} found, cuDNN 9.x is needed (pip install nvidia-cudnn-cu13)"
            )));
        }
        let handle = dnn::create_handle().map_err(cuda_err("creating the cuDNN handle"))?;
        let handle = DnnHandle { raw: handle, stream: stream.clone() };
        // SAFETY: the handle was just created and the stream is alive for as long as the handle (held above).
        unsafe { dnn::set_stream(handle.raw, handle.stream.cu_stream() as sys::cudaStream_t) }
            .map_err(cuda_err("binding cuDNN to the stream"))?;
        Ok(handle)
    }
}

impl Drop for DnnHandle {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here. A failure at teardown has no one left to report to.
        let _ = unsafe { dnn::destroy_handle(self.raw) };
    }
}

pub(crate) struct TensorDesc(pub(crate) sys::cudnnTensorDescriptor_t);
pub(crate) struct FilterDesc(pub(crate) sys::cudnnFilterDescriptor_t);
pub(crate) struct ConvDesc(pub(crate) sys::cudnnConvolutionDescriptor_t);

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_tensor_descriptor, dropped once.
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_filter_descriptor, dropped once.
        let _ = unsafe { dnn::destroy_filter_descriptor(self.0) };
    }
}
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_convolution_descriptor, dropped once.
        let _ = unsafe { dnn::destroy_convolution_descriptor(self.0) };
    }
}

pub(crate) fn int(v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::invalid(format!("CUDA: dimension {v} is too large for cuDNN")))
}

/// How activations and weights are stored on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// fp32 NCHW (weights OIHW): the layout of the engine's `Tensor` and of PyTorch checkpoints.
    F32Nchw,
    /// bf16 NHWC (weights OHWI), fp32 accumulation: what tensor cores want, PyTorch's autocast + channels-last.
    Bf16Nhwc,
}

impl Storage {
    fn data_type(self) -> sys::cudnnDataType_t {
        match self {
            Storage::F32Nchw => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            Storage::Bf16Nhwc => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        }
    }
    fn format(self) -> sys::cudnnTensorFormat_t {
        match self {
            Storage::F32Nchw => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            Storage::Bf16Nhwc => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
        }
    }
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            Storage::F32Nchw => 4,
            Storage::Bf16Nhwc => 2,
        }
    }
}

/// Tensor descriptor of logical dims `[N, C, H, W]` in `storage`'s type and layout.
pub(crate) fn tensor_desc(dims: [usize; 4], storage: Storage) -> Result<TensorDesc> {
    let d = TensorDesc(dnn::create_tensor_descriptor().map_err(cuda_err("creating a tensor descriptor"))?);
    let dims = [int(dims[0])?, int(dims[1])?, int(dims[2])?, int(dims[3])?];
    // SAFETY: `d` is a live descriptor; the call only stores the dimensions.
    unsafe { dnn::set_tensor4d_descriptor(d.0, storage.format(), storage.data_type(), dims) }
        .map_err(cuda_err("describing a tensor"))?;
    Ok(d)
}

/// Everything that determines a forward convolution's algorithm and workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Input `[N, C, H, W]`.
    pub x: [usize; 4],
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn y(&self) -> [usize; 4] {
        let [n, _, h, w] = self.x;
        let (oh, ow) = ConvGeom::square(self.stride, self.pad).output_hw(h, w, self.kernel, self.kernel);
        [n, self.out_channels, oh, ow]
    }

    pub fn weight_len(&self) -> usize {
        self.out_channels * self.x[1] * self.kernel * self.kernel
    }
}

/// `cudnnConvolutionFwdAlgoPerf_t`, `cudnnConvolutionBwdDataAlgoPerf_t` and `cudnnConvolutionBwdFilterAlgoPerf_t`
/// (one layout) with their enums read as plain integers: a cuDNN newer than the bindings may report a value the
/// Rust enums do not list, which must not be materialised as an enum.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct AlgoPerf {
    pub(crate) algo: u32,
    pub(crate) status: u32,
    pub(crate) time: f32,
    pub(crate) memory: usize,
    pub(crate) determinism: u32,
    pub(crate) math_type: u32,
    pub(crate) reserved: [c_int; 3],
}
const _: () = {
    use std::mem::{align_of, size_of};
    assert!(size_of::<AlgoPerf>() == size_of::<sys::cudnnConvolutionFwdAlgoPerf_t>());
    assert!(align_of::<AlgoPerf>() == align_of::<sys::cudnnConvolutionFwdAlgoPerf_t>());
    assert!(size_of::<AlgoPerf>() == size_of::<sys::cudnnConvolutionBwdDataAlgoPerf_t>());
    assert!(align_of::<AlgoPerf>() == align_of::<sys::cudnnConvolutionBwdDataAlgoPerf_t>());
    assert!(size_of::<AlgoPerf>() == size_of::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>());
    assert!(align_of::<AlgoPerf>() == align_of::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>());
};

fn fwd_algo(v: u32) -> Option<sys::cudnnConvolutionFwdAlgo_t> {
    use sys::cudnnConvolutionFwdAlgo_t::*;
    Some(match v {
        0 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        1 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        2 => CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        3 => CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        4 => CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        5 => CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        6 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        7 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        _ => return None,
    })
}

/// Chosen forward algorithms and their workspace sizes, by shape, TF32 permission and storage.
#[derive(Default)]
pub struct AlgoCache(HashMap<(ConvShape, bool, Storage), (sys::cudnnConvolutionFwdAlgo_t, usize)>);

/// A forward convolution ready to run: descriptors, algorithm, workspace size.
pub struct ConvPlan {
    pub shape: ConvShape,
    storage: Storage,
    pub(crate) x: TensorDesc,
    pub(crate) w: FilterDesc,
    pub(crate) conv: ConvDesc,
    pub(crate) y: TensorDesc,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    /// Bytes of workspace the algorithm needs.
    pub workspace: usize,
}

impl ConvPlan {
    /// The storage the plan's descriptors describe.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    pub fn new(dev: &Device, cache: &mut AlgoCache, shape: ConvShape, storage: Storage) -> Result<ConvPlan> {
        let [_, c, _, _] = shape.x;
        let k = int(shape.kernel)?;
        let x = tensor_desc(shape.x, storage)?;
        let y = tensor_desc(shape.y(), storage)?;
        let w = FilterDesc(dnn::create_filter_descriptor().map_err(cuda_err("creating a filter descriptor"))?);
        // SAFETY: `w` is a live descriptor; the call only stores the logical dimensions [O, C, kh, kw] (stored
        // OIHW for NCHW, OHWI for NHWC).
        unsafe {
            dnn::set_filter4d_descriptor(
                w.0,
                storage.data_type(),
                storage.format(),
                [int(shape.out_channels)?, int(c)?, k, k],
            )
        }
        .map_err(cuda_err("describing a filter"))?;
        let conv =
            ConvDesc(dnn::create_convolution_descriptor().map_err(cuda_err("creating a convolution descriptor"))?);
        let (pad, stride) = (int(shape.pad)?, int(shape.stride)?);
        let math = if storage == Storage::Bf16Nhwc {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else if dev.allow_tf32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        // SAFETY: `conv` is a live descriptor; these calls only store parameters. Cross-correlation is what
        // PyTorch calls convolution; fp32 accumulation for both storages.
        unsafe {
            dnn::set_convolution2d_descriptor(
                conv.0,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .and_then(|()| dnn::set_convolution_math_type(conv.0, math))
        }
        .map_err(cuda_err("describing a convolution"))?;

        // cuDNN's own output size must agree with ours, or the buffers sized from ours would be wrong.
        let mut dims: [c_int; 4] = [0; 4];
        let [dn, dc, dh, dw] = &mut dims;
        // SAFETY: all three descriptors are live and fully set; the four out-pointers are valid c_ints.
        unsafe { sys::cudnnGetConvolution2dForwardOutputDim(conv.0, x.0, w.0, dn, dc, dh, dw) }
            .result()
            .map_err(cuda_err("computing a convolution's output size"))?;
        let want = shape.y();
        if dims.iter().zip(want).any(|(&a, b)| usize::try_from(a).ok() != Some(b)) {
            return Err(Error::invalid(format!(
                "CUDA: cuDNN computes output {dims:?} for {shape:?}, expected {want:?}"
            )));
        }

        let key = (shape, dev.allow_tf32, storage);
        let (algo, searched) = match cache.0.get(&key) {
            Some(&hit) => hit,
            None => {
                let tensor_ops = dev.allow_tf32 || storage == Storage::Bf16Nhwc;
                let chosen = find_algorithm(dev, &x, &w, &conv, &y, shape, tensor_ops)?;
                cache.0.insert(key, chosen);
                chosen
            }
        };
        // The search reports the workspace of its own trial; ask again for these descriptors and keep the larger.
        // SAFETY: the handle and all four descriptors are live and fully set; `algo` came from cuDNN.
        let asked = unsafe { dnn::get_convolution_forward_workspace_size(dev.dnn.raw(), x.0, w.0, conv.0, y.0, algo) }
            .map_err(cuda_err("sizing a convolution workspace"))?;
        let workspace = searched.max(asked);
        Ok(ConvPlan { shape, storage, x, w, conv, y, algo, workspace })
    }

    /// y = conv(x, w), enqueued on the device's stream, with buffers of the plan's storage (`f32`, or `u16` holding
    /// bf16 bits). The element size and buffer lengths are checked here, which is what makes the cuDNN call sound:
    /// it reads N·C·H·W and O·C·k·k values and writes N·O·OH·OW, within those buffers.
    pub fn forward<T>(&self, dev: &Device, x: &Buf<T>, w: &Buf<T>, y: &Buf<T>, workspace: &Buf<u8>) -> Result<()> {
        let need_x: usize = self.shape.x.iter().product();
        let need_y: usize = self.shape.y().iter().product();
        if std::mem::size_of::<T>() != self.storage.bytes() {
            return Err(Error::invalid(format!(
                "CUDA: {}-byte buffers given to a {:?} convolution",
                std::mem::size_of::<T>(),
                self.storage
            )));
        }
        if x.len < need_x || w.len < self.shape.weight_len() || y.len < need_y || workspace.len < self.workspace {
            return Err(Error::invalid(format!("CUDA: buffers too small for convolution {:?}", self.shape)));
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: descriptors are live and describe tensors of the plan's storage, whose element size and counts
        // were checked against the buffers above; x, w and y do not overlap (distinct allocations; the executor never passes the same slot for x and
        // y); the workspace holds at least the bytes cuDNN asked for; alpha/beta are host f32s as cuDNN expects for
        // float and bf16 data; everything is enqueued on the handle's stream, which owns all these buffers.
        unsafe {
            dnn::convolution_forward(
                dev.dnn.raw(),
                &alpha as *const f32 as *const c_void,
                self.x.0,
                x.ptr as *const c_void,
                self.w.0,
                w.ptr as *const c_void,
                self.conv.0,
                self.algo,
                workspace.ptr as *mut c_void,
                self.workspace,
                &beta as *const f32 as *const c_void,
                self.y.0,
                y.ptr as *mut c_void,
            )
        }
        .map_err(cuda_err("convolution forward"))
    }
}

impl DnnHandle {
    pub fn raw(&self) -> sys::cudnnHandle_t {
        self.raw
    }
}

/// The successful results of a timed search (fastest first, as cuDNN orders them) among the first `returned`
/// of `perf`, without tensor-op algorithms unless `tensor_ops` (TF32 allowed, or bf16 storage where they are the
/// point): shared by the forward search and the trainer's backward searches.
pub(crate) fn usable(tensor_ops: bool, perf: &[AlgoPerf], returned: c_int) -> impl Iterator<Item = &AlgoPerf> {
    let returned = usize::try_from(returned).unwrap_or(0).min(perf.len());
    const SUCCESS: u32 = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS as u32;
    let tensor_op = [
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH as u32,
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION as u32,
    ];
    perf[..returned].iter().filter(move |p| p.status == SUCCESS && (tensor_ops || !tensor_op.contains(&p.math_type)))
}

/// Run cuDNN's timed search and keep the fastest algorithm that succeeded and respects the precision setting.
fn find_algorithm(
    dev: &Device,
    x: &TensorDesc,
    w: &FilterDesc,
    conv: &ConvDesc,
    y: &TensorDesc,
    shape: ConvShape,
    tensor_ops: bool,
) -> Result<(sys::cudnnConvolutionFwdAlgo_t, usize)> {
    const REQUESTED: usize = 8; // CUDNN_CONVOLUTION_FWD_ALGO_COUNT
    let mut perf = [AlgoPerf::default(); REQUESTED];
    let mut returned: c_int = 0;
    // SAFETY: descriptors are live and fully set; `perf` has room for REQUESTED entries, laid out exactly as
    // cudnnConvolutionFwdAlgoPerf_t (size and alignment asserted above, field types identical in width); cuDNN
    // allocates its own scratch memory for this variant and writes `returned` ≤ REQUESTED entries.
    unsafe {
        sys::cudnnFindConvolutionForwardAlgorithm(
            dev.dnn.raw(),
            x.0,
            w.0,
            conv.0,
            y.0,
            REQUESTED as c_int,
            &mut returned,
            perf.as_mut_ptr().cast(),
        )
    }
    .result()
    .map_err(cuda_err("searching convolution algorithms"))?;
    usable(tensor_ops, &perf, returned)
        .find_map(|p| fwd_algo(p.algo).map(|a| (a, p.memory)))
        .ok_or_else(|| Error::invalid(format!("CUDA: cuDNN has no usable forward algorithm for {shape:?}")))
}
