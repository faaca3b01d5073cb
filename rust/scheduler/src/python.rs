//! `omniserve._scheduler`: a thin PyO3 layer over the core. It converts arguments, copies the
//! step buffers into bytearrays allocated once, and maps `SchedulerError` onto the exception
//! hierarchy of `_scheduler.pyi`. No scheduling logic lives here.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyDict, PyType};

use crate::step_io::{
    BufData, Buffer, FINISH_LENGTH, FINISH_NONE, FINISH_STOP, FLAG_NEEDS_LOGITS, FLAG_NEW_ROW,
    FLAG_PREFILL, FLAG_RESELECT,
};
use crate::{AbortHandle, NewRequest, Scheduler, SchedulerConfig, SchedulerError};

create_exception!(
    omniserve._scheduler,
    OmniserveError,
    PyException,
    "Base of every error the project raises."
);
create_exception!(
    omniserve._scheduler,
    RequestRejectedError,
    OmniserveError,
    "The request can never be served: its prompt exceeds the model or the KV cache."
);
create_exception!(
    omniserve._scheduler,
    SchedulerInternalError,
    OmniserveError,
    "An invariant broke inside the scheduler (a bug); the scheduler should be discarded."
);

/// `InvalidRequestError(OmniserveError, ValueError)`. `create_exception!` takes a single base,
/// so this class is made by calling `type()` once, like a class statement would.
static INVALID_REQUEST_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn invalid_request_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    let ty = INVALID_REQUEST_ERROR.get_or_try_init(py, || -> PyResult<_> {
        let namespace = PyDict::new(py);
        namespace.set_item("__module__", "omniserve._scheduler")?;
        namespace.set_item(
            "__doc__",
            "The request is malformed: duplicate id, empty prompt, bad limits.",
        )?;
        let bases = (
            py.get_type::<OmniserveError>(),
            py.get_type::<PyValueError>(),
        );
        let ty = py
            .get_type::<PyType>()
            .call1(("InvalidRequestError", bases, namespace))?;
        Ok(ty.cast_into::<PyType>()?.unbind())
    })?;
    Ok(ty.bind(py))
}

impl From<SchedulerError> for PyErr {
    fn from(err: SchedulerError) -> PyErr {
        let msg = err.to_string();
        match err {
            SchedulerError::InvalidConfig(_) | SchedulerError::InvalidRequest { .. } => {
                Python::attach(|py| match invalid_request_error(py) {
                    Ok(ty) => PyErr::from_type(ty.clone(), msg),
                    Err(e) => e,
                })
            }
            SchedulerError::Rejected { .. } => RequestRejectedError::new_err(msg),
            SchedulerError::StepOrder(_) => OmniserveError::new_err(msg),
            SchedulerError::Internal(_) => SchedulerInternalError::new_err(msg),
        }
    }
}

/// A Python int as a config field.
fn config_u32(name: &str, value: i64) -> Result<u32, SchedulerError> {
    u32::try_from(value).map_err(|_| {
        SchedulerError::InvalidConfig(format!("{name} must be in [0, 2^32), got {value}"))
    })
}

#[pyclass(name = "SchedulerConfig", module = "omniserve._scheduler", frozen)]
struct PyConfig(SchedulerConfig);

#[pymethods]
impl PyConfig {
    // The defaults mirror `SchedulerConfig::new` and the .pyi.
    #[new]
    #[pyo3(signature = (
        *,
        num_dense_pages,
        max_model_len,
        page_size = 64,
        max_num_seqs = 256,
        max_num_batched_tokens = 8192,
        max_partial_prefills = 4,
        long_prefill_token_threshold = 0,
        watermark = 0.01,
        skip_limit = 8,
        hol_age_steps = 64,
        policy = "fcfs",
        num_stream_pages = 0,
        stream_sink_pages = 0,
        stream_local_pages = 0,
        logical_pages_per_page = 4,
        select_interval = 4,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_dense_pages: i64,
        max_model_len: i64,
        page_size: i64,
        max_num_seqs: i64,
        max_num_batched_tokens: i64,
        max_partial_prefills: i64,
        long_prefill_token_threshold: i64,
        watermark: f64,
        skip_limit: i64,
        hol_age_steps: i64,
        policy: &str,
        num_stream_pages: i64,
        stream_sink_pages: i64,
        stream_local_pages: i64,
        logical_pages_per_page: i64,
        select_interval: i64,
    ) -> PyResult<Self> {
        let cfg = SchedulerConfig {
            page_size: config_u32("page_size", page_size)?,
            num_dense_pages: config_u32("num_dense_pages", num_dense_pages)?,
            max_num_seqs: config_u32("max_num_seqs", max_num_seqs)?,
            max_num_batched_tokens: config_u32("max_num_batched_tokens", max_num_batched_tokens)?,
            max_model_len: config_u32("max_model_len", max_model_len)?,
            max_partial_prefills: config_u32("max_partial_prefills", max_partial_prefills)?,
            long_prefill_token_threshold: config_u32(
                "long_prefill_token_threshold",
                long_prefill_token_threshold,
            )?,
            watermark,
            skip_limit: config_u32("skip_limit", skip_limit)?,
            hol_age_steps: config_u32("hol_age_steps", hol_age_steps)?,
            policy: policy.parse()?,
            num_stream_pages: config_u32("num_stream_pages", num_stream_pages)?,
            stream_sink_pages: config_u32("stream_sink_pages", stream_sink_pages)?,
            stream_local_pages: config_u32("stream_local_pages", stream_local_pages)?,
            logical_pages_per_page: config_u32("logical_pages_per_page", logical_pages_per_page)?,
            select_interval: config_u32("select_interval", select_interval)?,
        };
        cfg.validate()?;
        Ok(Self(cfg))
    }

    #[getter]
    fn page_size(&self) -> u32 {
        self.0.page_size
    }
    #[getter]
    fn num_dense_pages(&self) -> u32 {
        self.0.num_dense_pages
    }
    #[getter]
    fn max_num_seqs(&self) -> u32 {
        self.0.max_num_seqs
    }
    #[getter]
    fn max_num_batched_tokens(&self) -> u32 {
        self.0.max_num_batched_tokens
    }
    #[getter]
    fn max_model_len(&self) -> u32 {
        self.0.max_model_len
    }
    #[getter]
    fn max_partial_prefills(&self) -> u32 {
        self.0.max_partial_prefills
    }
    #[getter]
    fn long_prefill_token_threshold(&self) -> u32 {
        self.0.long_prefill_token_threshold
    }
    #[getter]
    fn watermark(&self) -> f64 {
        self.0.watermark
    }
    #[getter]
    fn skip_limit(&self) -> u32 {
        self.0.skip_limit
    }
    #[getter]
    fn hol_age_steps(&self) -> u32 {
        self.0.hol_age_steps
    }
    #[getter]
    fn policy(&self) -> &'static str {
        self.0.policy.as_str()
    }
    #[getter]
    fn num_stream_pages(&self) -> u32 {
        self.0.num_stream_pages
    }
    #[getter]
    fn stream_sink_pages(&self) -> u32 {
        self.0.stream_sink_pages
    }
    #[getter]
    fn stream_local_pages(&self) -> u32 {
        self.0.stream_local_pages
    }
    #[getter]
    fn logical_pages_per_page(&self) -> u32 {
        self.0.logical_pages_per_page
    }
    #[getter]
    fn select_interval(&self) -> u32 {
        self.0.select_interval
    }
}

#[pyclass(name = "AbortHandle", module = "omniserve._scheduler", frozen)]
struct PyAbortHandle(AbortHandle);

#[pymethods]
impl PyAbortHandle {
    fn abort(&self, req_id: i64) {
        self.0.abort(req_id);
    }
}

#[pyclass(name = "Scheduler", module = "omniserve._scheduler")]
struct PyScheduler {
    core: Scheduler,
    config: Py<PyConfig>,
    /// What `buffers()` returns: the bytearrays of `arrays`, by name.
    buffers: Py<PyDict>,
    /// One bytearray per `Buffer`, indexed by `Buffer as usize`.
    arrays: Vec<Py<PyByteArray>>,
}

#[pymethods]
impl PyScheduler {
    #[new]
    fn new(py: Python<'_>, config: Bound<'_, PyConfig>) -> PyResult<Self> {
        let core = Scheduler::new(config.get().0.clone())?;
        let buffers = PyDict::new(py);
        let mut arrays = Vec::with_capacity(Buffer::ALL.len());
        for buf in Buffer::ALL {
            let len = buf.capacity(core.config()) * buf.dtype().size();
            let array = PyByteArray::new_with(py, len, |_| Ok(()))?;
            buffers.set_item(buf.name(), &array)?;
            arrays.push(array.unbind());
        }
        Ok(Self {
            core,
            config: config.unbind(),
            buffers: buffers.unbind(),
            arrays,
        })
    }

    #[getter]
    fn config(&self, py: Python<'_>) -> Py<PyConfig> {
        self.config.clone_ref(py)
    }

    fn buffers(&self, py: Python<'_>) -> Py<PyDict> {
        self.buffers.clone_ref(py)
    }

    fn abort_handle(&self) -> PyAbortHandle {
        PyAbortHandle(self.core.abort_handle())
    }

    #[pyo3(signature = (req_id, prompt, *, max_tokens, min_tokens = 0, stop_token_ids = Vec::new(), priority = 0))]
    fn add_request(
        &mut self,
        req_id: i64,
        prompt: Vec<i32>,
        max_tokens: i64,
        min_tokens: i64,
        stop_token_ids: Vec<i32>,
        priority: i64,
    ) -> PyResult<()> {
        let limit = |name: &str, value: i64| {
            if value < 0 {
                Err(SchedulerError::InvalidRequest {
                    id: req_id,
                    reason: format!("{name} must be >= 0, got {value}"),
                })
            } else {
                // Beyond u32::MAX a limit is as good as none.
                Ok(u32::try_from(value).unwrap_or(u32::MAX))
            }
        };
        let req = NewRequest {
            id: req_id,
            prompt,
            max_tokens: limit("max_tokens", max_tokens)?,
            min_tokens: limit("min_tokens", min_tokens)?,
            stop_token_ids,
            priority,
        };
        Ok(self.core.add_request(req)?)
    }

    fn schedule(&mut self, py: Python<'_>) -> PyResult<(usize, usize, usize, usize, usize, usize)> {
        let c = self.core.schedule()?;
        for buf in Buffer::SCHEDULE_OUTPUTS {
            self.copy_out(py, buf)?;
        }
        Ok((
            c.num_reqs,
            c.num_tokens,
            c.num_page_updates,
            c.num_stream_updates,
            c.num_aborted,
            c.num_preempted,
        ))
    }

    fn update(&mut self, py: Python<'_>) -> PyResult<usize> {
        let num_reqs = self.core.io().req_ids().len();
        let sampled = self.arrays[Buffer::Sampled as usize].bind(py);
        // SAFETY: the GIL is held (the module declares `gil_used`) and no Python code runs while
        // the slice lives, so nothing can resize or free the bytearray under it.
        let bytes = unsafe { sampled.as_bytes() };
        let dst = &mut self.core.sampled_mut()[..num_reqs];
        if bytes.len() < dst.len() * 4 {
            return Err(OmniserveError::new_err("the 'sampled' buffer was resized"));
        }
        for (token, chunk) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
            *token = i32::from_ne_bytes(chunk.try_into().expect("4-byte chunk"));
        }
        let n = self.core.update()?;
        for buf in Buffer::UPDATE_OUTPUTS {
            self.copy_out(py, buf)?;
        }
        Ok(n)
    }

    fn finish(&mut self, req_id: i64) -> bool {
        self.core.finish(req_id)
    }

    fn has_unfinished(&self) -> bool {
        self.core.has_unfinished()
    }

    fn num_unfinished(&self) -> usize {
        self.core.num_unfinished()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.core.stats();
        let dict = PyDict::new(py);
        dict.set_item("running", s.running)?;
        dict.set_item("waiting", s.waiting)?;
        dict.set_item("dense_pages_used", s.dense_pages_used)?;
        dict.set_item("dense_pages_total", s.dense_pages_total)?;
        dict.set_item("stream_pages_used", s.stream_pages_used)?;
        dict.set_item("stream_pages_total", s.stream_pages_total)?;
        dict.set_item("num_preemptions", s.num_preemptions)?;
        dict.set_item("num_steps", s.num_steps)?;
        dict.set_item("num_finished", s.num_finished)?;
        Ok(dict)
    }

    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        // O(pages + requests): let other Python threads run meanwhile.
        Ok(py.detach(|| self.core.check_invariants())?)
    }
}

impl PyScheduler {
    /// Copies the filled prefix of one core buffer into its bytearray.
    fn copy_out(&self, py: Python<'_>, buf: Buffer) -> PyResult<()> {
        let array = self.arrays[buf as usize].bind(py);
        // SAFETY: as in `update`: GIL held, no Python code runs while the slice lives.
        let bytes = unsafe { array.as_bytes_mut() };
        let data = self.core.io().data(buf);
        if bytes.len() < data.len() * buf.dtype().size() {
            return Err(OmniserveError::new_err(format!(
                "the '{}' buffer was resized",
                buf.name()
            )));
        }
        match data {
            BufData::I32(src) => write_ne(bytes, src, i32::to_ne_bytes),
            BufData::I64(src) => write_ne(bytes, src, i64::to_ne_bytes),
        }
        Ok(())
    }
}

/// Writes `src` into `dst` in native byte order, as `numpy.frombuffer` reads it.
fn write_ne<T: Copy, const N: usize>(dst: &mut [u8], src: &[T], to_bytes: fn(T) -> [u8; N]) {
    for (chunk, &value) in dst.chunks_exact_mut(N).zip(src) {
        chunk.copy_from_slice(&to_bytes(value));
    }
}

// The step buffers are read and written through raw bytearray slices, which is sound only
// while the GIL serialises Python code, hence `gil_used = true`.
#[pymodule(gil_used = true)]
fn _scheduler(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyConfig>()?;
    m.add_class::<PyAbortHandle>()?;
    m.add_class::<PyScheduler>()?;
    m.add("OmniserveError", py.get_type::<OmniserveError>())?;
    m.add("InvalidRequestError", invalid_request_error(py)?)?;
    m.add(
        "RequestRejectedError",
        py.get_type::<RequestRejectedError>(),
    )?;
    m.add(
        "SchedulerInternalError",
        py.get_type::<SchedulerInternalError>(),
    )?;
    for (name, value) in [
        ("FLAG_PREFILL", FLAG_PREFILL),
        ("FLAG_NEEDS_LOGITS", FLAG_NEEDS_LOGITS),
        ("FLAG_RESELECT", FLAG_RESELECT),
        ("FLAG_NEW_ROW", FLAG_NEW_ROW),
        ("FINISH_NONE", FINISH_NONE),
        ("FINISH_STOP", FINISH_STOP),
        ("FINISH_LENGTH", FINISH_LENGTH),
    ] {
        m.add(name, value)?;
    }
    Ok(())
}
