//! `VLLM_OP_TIMING=1`: the eager CUDA forward waits for the device after every op and sums
//! the time per op kind, decode-only steps apart from steps with prefill tokens; printed
//! when the model drops. Host and device run in lockstep under it, so its throughput means
//! nothing: it says where the device time of a step goes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::CudaStream;

use crate::error::{EngineError, Result};

#[derive(Default)]
pub struct OpTiming {
    /// "decode/attention" -> (seconds, calls); plus "decode/steps" counts.
    totals: Mutex<BTreeMap<String, (f64, u64)>>,
}

impl OpTiming {
    pub fn from_env() -> Option<OpTiming> {
        std::env::var_os("VLLM_OP_TIMING").map(|_| OpTiming::default())
    }
}

impl Drop for OpTiming {
    fn drop(&mut self) {
        let Ok(totals) = self.totals.lock() else { return };
        for kind in ["decode", "mixed"] {
            let steps = totals.get(&format!("{kind}/steps")).map_or(0, |t| t.1);
            if steps == 0 {
                continue;
            }
            let mut line = format!("op timing, {kind} steps ({steps}), ms per step:");
            let mut sum = 0.0;
            for (name, (s, _)) in totals
                .iter()
                .filter(|(n, _)| n.starts_with(kind) && !n.ends_with("/steps"))
            {
                let ms = s * 1e3 / steps as f64;
                sum += ms;
                line.push_str(&format!(" {} {ms:.3}", &name[kind.len() + 1..]));
            }
            eprintln!("{line}; total {sum:.3}");
        }
    }
}

/// Laps of one forward pass (a no-op when timing is off).
pub struct OpClock<'a> {
    timing: Option<&'a OpTiming>,
    stream: &'a Arc<CudaStream>,
    kind: &'static str,
    last: Instant,
}

impl<'a> OpClock<'a> {
    pub fn start(timing: Option<&'a OpTiming>, stream: &'a Arc<CudaStream>, decode_only: bool) -> Result<Self> {
        let kind = if decode_only { "decode" } else { "mixed" };
        let mut clock = OpClock {
            timing,
            stream,
            kind,
            last: Instant::now(),
        };
        clock.lap("steps")?;
        Ok(clock)
    }

    /// Waits for the device and books the time since the last lap to `name`.
    pub fn lap(&mut self, name: &str) -> Result<()> {
        let Some(timing) = self.timing else { return Ok(()) };
        self.stream
            .synchronize()
            .map_err(|e| EngineError::internal(format!("synchronize: {e}")))?;
        let now = Instant::now();
        let mut totals = timing
            .totals
            .lock()
            .map_err(|_| EngineError::internal("op timing poisoned"))?;
        let entry = totals.entry(format!("{}/{name}", self.kind)).or_default();
        entry.0 += (now - self.last).as_secs_f64();
        entry.1 += 1;
        self.last = now;
        Ok(())
    }
}
