//! Opening a CUDA device: the driver, one stream, cuBLAS, cuDNN and device buffers.
//!
//! cudarc loads every library lazily and panics when one is missing, so each library is probed first and a
//! missing one becomes a one-line error that names it and says where to get it. A library that loads but lacks a
//! symbol this build calls also panics inside cudarc; `guarded` turns that into an error too.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};

use super::conv::DnnHandle;
use crate::error::{Error, Result, catch_parser_panic};

/// Where the user libraries come from when there is no CUDA toolkit: NVIDIA's PyPI wheels.
const LIBRARY_HINT: &str = "install them with `pip install nvidia-cudnn-cu13 nvidia-cublas nvidia-cuda-nvrtc` \
     (or a CUDA 12/13 toolkit with cuDNN 9) and add their lib folders (site-packages/nvidia/*/lib) to LD_LIBRARY_PATH";

/// A cudarc error as one of ours, saying which step failed.
pub(crate) fn cuda_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::device(format!("CUDA: {what} failed: {e:?}"))
}

/// Run `f`, turning a panic inside cudarc (a library that lacks a symbol this build calls) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_parser_panic(f).unwrap_or_else(|| {
        Err(Error::device(format!(
            "CUDA: {what} failed: a CUDA library lacks a function this build calls \
             (it needs a CUDA 12.x/13.x driver, cuBLAS 12/13, NVRTC 12/13 and cuDNN 9)"
        )))
    })
}

/// Compile CUDA C `source` with NVRTC and load it on the device, with a lookup of its kernels by name; `what`
/// names the module in errors ("the bf16 training kernels").
pub(crate) fn load_kernels(
    dev: &Device,
    source: &str,
    what: &'static str,
) -> Result<(Arc<CudaModule>, impl Fn(&str) -> Result<CudaFunction> + use<>)> {
    let ptx = cudarc::nvrtc::compile_ptx(source)
        .map_err(|e| Error::device(format!("CUDA: compiling {what} with NVRTC failed: {e:?}")))?;
    let module = dev.ctx.load_module(ptx).map_err(|e| Error::device(format!("CUDA: loading {what} failed: {e:?}")))?;
    let lookup = module.clone();
    let find = move |name: &str| {
        lookup.load_function(name).map_err(|e| Error::device(format!("CUDA: kernel {name} of {what} not found: {e:?}")))
    };
    Ok((module, find))
}

/// One device, one stream, and the library handles bound to that stream. Everything the executor enqueues goes on
/// this single stream, so its order is the program order and no cross-stream synchronisation exists.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub dnn: DnnHandle,
    pub allow_tf32: bool,
}

impl Device {
    /// Open device `index`. TF32 stays off unless `allow_tf32`: cuDNN gets FMA-only math and cuBLAS its default
    /// (IEEE fp32) math, which is what the parity tests need.
    pub fn open(index: usize, allow_tf32: bool) -> Result<Device> {
        // SAFETY: the probe only dlopen()s candidate library names and closes them again; no symbol is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::device(
                "CUDA: the NVIDIA driver library (libcuda.so.1) was not found: this machine has no NVIDIA driver \
                 installed (use --device cpu)",
            ));
        }
        let count = guarded("driver initialisation", || {
            CudaContext::device_count()
                .map_err(|e| Error::device(format!("CUDA: no usable CUDA device ({e:?}); use --device cpu")))
        })?;
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Err(Error::device("CUDA: the driver found no CUDA device (use --device cpu)"));
        }
        if index >= count {
            return Err(Error::invalid(format!(
                "CUDA: there is no device cuda:{index} (this machine has {count}: cuda:0..cuda:{})",
                count - 1
            )));
        }
        // SAFETY: as above, probes only.
        let present = unsafe {
            [
                ("cuDNN 9 (libcudnn.so.9)", cudarc::cudnn::sys::is_culib_present()),
                ("cuBLAS (libcublas.so.13 or .so.12)", blas_sys::is_culib_present()),
                ("NVRTC (libnvrtc.so.13 or .so.12)", cudarc::nvrtc::sys::is_culib_present()),
            ]
        };
        let missing: Vec<&str> = present.iter().filter(|(_, ok)| !ok).map(|(name, _)| *name).collect();
        if !missing.is_empty() {
            return Err(Error::device(format!("CUDA: library not found: {}; {LIBRARY_HINT}", missing.join(", "))));
        }
        guarded("device setup", || {
            let ctx = CudaContext::new(index).map_err(cuda_err("creating the device context"))?;
            // SAFETY: all work of this executor goes on one stream (see `Device`), so the per-buffer events cudarc
            // would record only cost time; no buffer is ever touched from a second stream.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(cuda_err("creating a stream"))?;
            let blas = CudaBlas::new(stream.clone()).map_err(cuda_err("creating the cuBLAS handle"))?;
            let math = if allow_tf32 {
                blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: the handle was just created by CudaBlas::new and lives as long as `blas`.
            unsafe { blas_sys::cublasSetMathMode(*blas.handle(), math) }
                .result()
                .map_err(cuda_err("setting the cuBLAS math mode"))?;
            let dnn = DnnHandle::new(&stream)?;
            Ok(Device { ctx, stream, blas, dnn, allow_tf32 })
        })
    }

    /// "NVIDIA H100 80GB HBM3 (cuda:0, sm_90)", for logs and bench output.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown device".into());
        let cc = self.ctx.compute_capability().map(|(a, b)| format!(", sm_{a}{b}")).unwrap_or_default();
        format!("{name} (cuda:{}{cc})", self.ctx.ordinal())
    }

    /// `len` zeroed values on the device.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> Result<Buf<T>> {
        let mem = self.stream.alloc_zeros::<T>(len.max(1)).map_err(cuda_err("allocating device memory"))?;
        Ok(Buf::wrap(mem, &self.stream, len))
    }

    pub fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<Buf<T>> {
        let mut buf = self.zeros(data.len())?;
        self.write(&mut buf, data)?;
        Ok(buf)
    }

    /// Copy `data` into the start of `buf`.
    pub fn write<T: cudarc::driver::DeviceRepr>(&self, buf: &mut Buf<T>, data: &[T]) -> Result<()> {
        assert!(data.len() <= buf.len, "CUDA: {} values do not fit a buffer of {}", data.len(), buf.len);
        if data.is_empty() {
            return Ok(());
        }
        let mut dst = buf.mem.slice_mut(0..data.len());
        self.stream.memcpy_htod(data, &mut dst).map_err(cuda_err("copying to the device"))
    }

    /// The first `len` values of `buf`, after everything enqueued before has finished.
    pub fn read<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, buf: &Buf<T>, len: usize) -> Result<Vec<T>> {
        assert!(len <= buf.len, "CUDA: cannot read {len} values from a buffer of {}", buf.len);
        let mut out = vec![T::default(); len];
        if len > 0 {
            self.stream.memcpy_dtoh(&buf.mem.slice(0..len), &mut out).map_err(cuda_err("copying from the device"))?;
        }
        self.stream.synchronize().map_err(cuda_err("waiting for the device"))?;
        Ok(out)
    }

    /// Copy the first `len` values of `src` into `dst`, in stream order (a device-side snapshot or restore).
    pub fn copy(&self, src: &Buf<f32>, dst: &mut Buf<f32>, len: usize) -> Result<()> {
        if len > src.len || len > dst.len {
            return Err(Error::invalid(format!(
                "CUDA: cannot copy {len} values between buffers of {} and {}",
                src.len, dst.len
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let mut to = dst.mem.slice_mut(0..len);
        self.stream.memcpy_dtod(&src.mem.slice(0..len), &mut to).map_err(cuda_err("copying on the device"))
    }
}

/// A device allocation of `len` values with its raw address, which cuDNN, cuBLAS and the kernels take. The address
/// is fixed for the allocation's life, and the buffer is freed (stream-ordered) only when dropped.
pub struct Buf<T> {
    mem: CudaSlice<T>,
    pub ptr: u64,
    pub len: usize,
}

impl<T> Buf<T> {
    fn wrap(mem: CudaSlice<T>, stream: &CudaStream, len: usize) -> Self {
        // With event tracking off the guard records nothing; the address is what we keep.
        let ptr = {
            let (ptr, _guard) = mem.device_ptr(stream);
            ptr
        };
        Buf { mem, ptr, len }
    }
}
