//! `omniserve._scheduler`: a thin PyO3 layer over the core. It converts arguments, exports the
//! core's description of the step protocol and of the config, copies the step buffers into
//! bytearrays allocated once, and maps `SchedulerError` onto the exception hierarchy of
//! `_scheduler.pyi`. No scheduling logic lives here.

use std::convert::Infallible;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyByteArray, PyDict, PyFloat, PyInt, PyString, PyTuple, PyType};

use crate::step_io::{
    BufData, Buffer, Phase, FINISH_LENGTH, FINISH_NONE, FINISH_REASONS, FINISH_STOP, FLAGS,
};
use crate::{
    AbortHandle, ConfigValue, NewRequest, Policy, Scheduler, SchedulerConfig, SchedulerError,
    StepCounts,
};

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

/// An `(OmniserveError, ValueError)` subclass. `create_exception!` takes a single base, so such
/// a class is made by calling `type()` once, like a class statement would.
fn value_error_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
    doc: &str,
) -> PyResult<&'py Bound<'py, PyType>> {
    let ty = cell.get_or_try_init(py, || -> PyResult<_> {
        let namespace = PyDict::new(py);
        namespace.set_item("__module__", "omniserve._scheduler")?;
        namespace.set_item("__doc__", doc)?;
        let bases = (
            py.get_type::<OmniserveError>(),
            py.get_type::<PyValueError>(),
        );
        let ty = py.get_type::<PyType>().call1((name, bases, namespace))?;
        Ok(ty.cast_into::<PyType>()?.unbind())
    })?;
    Ok(ty.bind(py))
}

static INVALID_REQUEST_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CONFIG_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn invalid_request_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    value_error_class(
        py,
        &INVALID_REQUEST_ERROR,
        "InvalidRequestError",
        "The request is malformed: duplicate id, empty prompt, bad limits.",
    )
}

fn config_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    value_error_class(
        py,
        &CONFIG_ERROR,
        "ConfigError",
        "An engine, model, scheduler or CLI option is invalid; the message names the option.",
    )
}

impl From<SchedulerError> for PyErr {
    fn from(err: SchedulerError) -> PyErr {
        let msg = err.to_string();
        let value_error = |class: fn(Python<'_>) -> PyResult<&Bound<'_, PyType>>| {
            Python::attach(|py| match class(py) {
                Ok(ty) => PyErr::from_type(ty.clone(), msg.clone()),
                Err(e) => e,
            })
        };
        match err {
            SchedulerError::InvalidConfig(_) => value_error(config_error),
            SchedulerError::InvalidRequest { .. } => value_error(invalid_request_error),
            SchedulerError::Rejected { .. } => RequestRejectedError::new_err(msg),
            SchedulerError::StepOrder(_) => OmniserveError::new_err(msg),
            SchedulerError::Internal(_) => SchedulerInternalError::new_err(msg),
        }
    }
}

impl<'py> IntoPyObject<'py> for Policy {
    type Target = PyString;
    type Output = Bound<'py, PyString>;
    type Error = Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        Ok(PyString::new(py, self.as_str()))
    }
}

fn to_config_value(name: &str, value: &Bound<'_, PyAny>) -> PyResult<ConfigValue> {
    // Before int, of which bool is a subclass: a flag passed for a number is a mistake, not 0 or 1.
    if let Ok(flag) = value.cast::<PyBool>() {
        return Ok(ConfigValue::Bool(flag.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        let v = value.extract().map_err(|_| {
            SchedulerError::InvalidConfig(format!("{name} is out of range: {value}"))
        })?;
        return Ok(ConfigValue::Int(v));
    }
    if value.is_instance_of::<PyFloat>() {
        return Ok(ConfigValue::Float(value.extract()?));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(ConfigValue::Str(s.to_str()?.to_owned()));
    }
    Err(SchedulerError::InvalidConfig(format!(
        "{name} must be a bool, int, float or str, got {}",
        value.get_type().name()?
    ))
    .into())
}

fn from_config_value(py: Python<'_>, value: ConfigValue) -> PyResult<Py<PyAny>> {
    Ok(match value {
        ConfigValue::Bool(v) => PyBool::new(py, v).to_owned().into_any().unbind(),
        ConfigValue::Int(v) => v.into_pyobject(py)?.into_any().unbind(),
        ConfigValue::Float(v) => v.into_pyobject(py)?.into_any().unbind(),
        ConfigValue::Str(v) => v.into_pyobject(py)?.into_any().unbind(),
    })
}

/// `cfg`, then each given field by name, then the whole config checked once.
fn build_config(
    mut cfg: SchedulerConfig,
    fields: Option<&Bound<'_, PyDict>>,
) -> PyResult<SchedulerConfig> {
    for (name, value) in fields.into_iter().flatten() {
        let name = name.cast::<PyString>()?.to_str()?.to_owned();
        let value = to_config_value(&name, &value)?;
        cfg.set(&name, value)?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// `Class(field=value, ...)`, each declared field read by name.
fn fields_repr<T: std::fmt::Display>(
    class: &str,
    fields: &[&str],
    get: impl Fn(&str) -> Option<T>,
) -> String {
    let fields: Vec<String> = fields
        .iter()
        .map(|name| format!("{name}={}", get(name).expect("a declared field")))
        .collect();
    format!("{class}({})", fields.join(", "))
}

#[pymethods]
impl SchedulerConfig {
    /// Field names, sizes first.
    #[classattr]
    #[pyo3(name = "FIELDS")]
    fn py_fields(py: Python<'_>) -> PyResult<Py<PyTuple>> {
        Ok(PyTuple::new(py, Self::FIELDS)?.unbind())
    }

    /// Each option's default (every field but the sizes `__init__` requires).
    #[classattr]
    #[pyo3(name = "DEFAULTS")]
    fn py_defaults(py: Python<'_>) -> PyResult<Py<PyDict>> {
        let defaults = SchedulerConfig::new(0, 0);
        let dict = PyDict::new(py);
        for name in Self::OPTIONS {
            let value = defaults.get(name).expect("a declared field");
            dict.set_item(name, from_config_value(py, value)?)?;
        }
        Ok(dict.unbind())
    }

    #[new]
    #[pyo3(signature = (*, num_dense_pages, max_model_len, **options))]
    fn py_new(
        num_dense_pages: &Bound<'_, PyAny>,
        max_model_len: &Bound<'_, PyAny>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let mut cfg = SchedulerConfig::new(0, 0);
        for (name, value) in [
            ("num_dense_pages", num_dense_pages),
            ("max_model_len", max_model_len),
        ] {
            cfg.set(name, to_config_value(name, value)?)?;
        }
        build_config(cfg, options)
    }

    /// Validates the given fields as `__init__` would, without building a scheduler: options
    /// not given are at their defaults, sizes not given at their smallest valid value (2).
    #[staticmethod]
    #[pyo3(signature = (**fields))]
    fn check(fields: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        build_config(SchedulerConfig::new(2, 2), fields).map(drop)
    }

    fn __repr__(&self) -> String {
        fields_repr("SchedulerConfig", Self::FIELDS, |name| self.get(name))
    }
}

#[pymethods]
impl StepCounts {
    #[classattr]
    #[pyo3(name = "FIELDS")]
    fn py_fields(py: Python<'_>) -> PyResult<Py<PyTuple>> {
        Ok(PyTuple::new(py, Self::FIELDS)?.unbind())
    }

    /// Counts of a hand-made step (tests, memory profiling); unnamed fields are 0.
    #[new]
    #[pyo3(signature = (**counts))]
    fn py_new(counts: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut c = StepCounts::default();
        for (name, value) in counts.into_iter().flatten() {
            let name = name.cast::<PyString>()?.to_str()?.to_owned();
            let value: usize = value.extract()?;
            let Some(field) = c.get_mut(&name) else {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "StepCounts has no field {name:?}; fields: {}",
                    Self::FIELDS.join(", ")
                )));
            };
            *field = value;
        }
        Ok(c)
    }

    fn __repr__(&self) -> String {
        fields_repr("StepCounts", Self::FIELDS, |name| self.get(name))
    }
}

/// One step buffer, as `STEP_BUFFERS` describes it: every attribute is read off the core's
/// `Buffer` declaration.
#[pyclass(name = "BufferSpec", module = "omniserve._scheduler", frozen)]
struct PyBufferSpec(Buffer);

#[pymethods]
impl PyBufferSpec {
    #[getter]
    fn name(&self) -> &'static str {
        self.0.name()
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.0.dtype().as_str()
    }
    #[getter]
    fn phase(&self) -> &'static str {
        self.0.phase().as_str()
    }
    #[getter]
    fn reader(&self) -> &'static str {
        self.0.reader().as_str()
    }
    #[getter]
    fn count(&self) -> &'static str {
        self.0.count()
    }
    #[getter]
    fn width(&self) -> usize {
        self.0.width()
    }
    #[getter]
    fn extra(&self) -> usize {
        self.0.extra()
    }
    #[getter]
    fn doc(&self) -> &'static str {
        self.0.doc()
    }

    /// Elements the buffer holds under `config`.
    fn capacity(&self, config: &SchedulerConfig) -> usize {
        self.0.capacity(config)
    }

    fn __repr__(&self) -> String {
        let b = self.0;
        let mut len = b.count().to_string();
        if b.width() > 1 {
            len = format!("{len} * {}", b.width());
        }
        if b.extra() > 0 {
            len = format!("{len} + {}", b.extra());
        }
        format!(
            "BufferSpec({}: {} [{len}], {} -> {}: {})",
            b.name(),
            b.dtype().as_str(),
            b.phase().as_str(),
            b.reader().as_str(),
            b.doc()
        )
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
    config: Py<SchedulerConfig>,
    /// What `buffers()` returns: the bytearrays of `arrays`, by name.
    buffers: Py<PyDict>,
    /// One bytearray per `Buffer`, indexed by `Buffer as usize`.
    arrays: Vec<Py<PyByteArray>>,
}

#[pymethods]
impl PyScheduler {
    #[new]
    fn new(py: Python<'_>, config: Bound<'_, SchedulerConfig>) -> PyResult<Self> {
        let core = Scheduler::new(config.get().clone())?;
        let buffers = PyDict::new(py);
        let mut arrays = Vec::with_capacity(Buffer::ALL.len());
        for &buf in Buffer::ALL {
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
    fn config(&self, py: Python<'_>) -> Py<SchedulerConfig> {
        self.config.clone_ref(py)
    }

    fn buffers(&self, py: Python<'_>) -> Py<PyDict> {
        self.buffers.clone_ref(py)
    }

    fn abort_handle(&self) -> PyAbortHandle {
        PyAbortHandle(self.core.abort_handle())
    }

    #[pyo3(signature = (req_id, prompt, *, max_tokens, min_tokens = 0, stop_token_ids = Vec::new(), priority = 0, cache_prefix = true))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &mut self,
        req_id: i64,
        prompt: Vec<i32>,
        max_tokens: i64,
        min_tokens: i64,
        stop_token_ids: Vec<i32>,
        priority: i64,
        cache_prefix: bool,
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
            cache_prefix,
        };
        Ok(self.core.add_request(req)?)
    }

    fn schedule(&mut self, py: Python<'_>) -> PyResult<StepCounts> {
        let counts = self.core.schedule()?;
        self.copy_out(py, Phase::Schedule)?;
        Ok(counts)
    }

    fn update(&mut self, py: Python<'_>) -> PyResult<usize> {
        let sampled = self.arrays[Buffer::Sampled as usize].bind(py);
        // SAFETY: the GIL is held (the module declares `gil_used`) and no Python code runs while
        // the slice lives, so nothing can resize or free the bytearray under it.
        let bytes = unsafe { sampled.as_bytes() };
        // All of it (max_num_seqs tokens): with async scheduling the step being updated is not
        // the one the buffers describe now.
        let dst = self.core.sampled_mut();
        if bytes.len() < dst.len() * 4 {
            return Err(OmniserveError::new_err("the 'sampled' buffer was resized"));
        }
        for (token, chunk) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
            *token = i32::from_ne_bytes(chunk.try_into().expect("4-byte chunk"));
        }
        let n = self.core.update()?;
        self.copy_out(py, Phase::Update)?;
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
        dict.set_item("prefix_cache_queries", s.prefix_cache_queries)?;
        dict.set_item("prefix_cache_hits", s.prefix_cache_hits)?;
        dict.set_item("prefix_cache_pages", s.prefix_cache_pages)?;
        Ok(dict)
    }

    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        // O(pages + requests): let other Python threads run meanwhile.
        Ok(py.detach(|| self.core.check_invariants())?)
    }
}

impl PyScheduler {
    /// Copies the filled prefix of every core buffer of `phase` into its bytearray.
    fn copy_out(&self, py: Python<'_>, phase: Phase) -> PyResult<()> {
        for &buf in Buffer::ALL.iter().filter(|b| b.phase() == phase) {
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
    m.add_class::<SchedulerConfig>()?;
    m.add_class::<StepCounts>()?;
    m.add_class::<PyBufferSpec>()?;
    m.add_class::<PyAbortHandle>()?;
    m.add_class::<PyScheduler>()?;
    m.add("OmniserveError", py.get_type::<OmniserveError>())?;
    m.add("ConfigError", config_error(py)?)?;
    m.add("InvalidRequestError", invalid_request_error(py)?)?;
    m.add(
        "RequestRejectedError",
        py.get_type::<RequestRejectedError>(),
    )?;
    m.add(
        "SchedulerInternalError",
        py.get_type::<SchedulerInternalError>(),
    )?;
    let specs: Vec<PyBufferSpec> = Buffer::ALL.iter().map(|&b| PyBufferSpec(b)).collect();
    m.add("STEP_BUFFERS", PyTuple::new(py, specs)?)?;
    for (name, value) in FLAGS {
        m.add(name, value)?;
    }
    m.add("FINISH_NONE", FINISH_NONE)?;
    m.add("FINISH_STOP", FINISH_STOP)?;
    m.add("FINISH_LENGTH", FINISH_LENGTH)?;
    let reasons = PyDict::new(py);
    for (code, reason) in FINISH_REASONS {
        reasons.set_item(code, reason.as_str())?;
    }
    m.add("FINISH_REASONS", reasons)?;
    Ok(())
}
