//! Memory planning: overflow-checked sizes, the memory this process can
//! still use, and a refusal that names both figures before anything large is
//! allocated (an allocation the system cannot back aborts the process).

/// A size that cannot be allocated.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The element or byte count overflows 64 bits.
    Overflow(String),
    /// More than the memory available now.
    TooLarge(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Overflow(msg) | Refusal::TooLarge(msg) => write!(f, "{msg}"),
        }
    }
}

/// The product of `dims`, or None when it overflows.
pub fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Bytes this process can still allocate: the kernel's MemAvailable, capped
/// by a cgroup v2 memory limit when one is set. None where unknown.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let mut available = kib.saturating_mul(1024);
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let (Some(max), Some(current)) = (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        available = available.min(max.saturating_sub(current));
    }
    Some(available)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuse `bytes` (None: overflowed) of `what` when it exceeds the memory
/// available now.
pub fn ensure(bytes: Option<u64>, what: &str) -> Result<(), Refusal> {
    let Some(bytes) = bytes else {
        return Err(Refusal::Overflow(format!("{what} is too large: its size overflows a 64-bit count")));
    };
    match available_bytes() {
        Some(free) if bytes > free => {
            Err(Refusal::TooLarge(format!("{what} needs {} but only {} of memory is available", gib(bytes), gib(free))))
        }
        _ => Ok(()),
    }
}

/// Bytes of `floats` f32 values (None when the count overflows).
pub fn f32_bytes(floats: Option<usize>) -> Option<u64> {
    (floats? as u64).checked_mul(std::mem::size_of::<f32>() as u64)
}

/// A zeroed f32 buffer of the product of `dims`, refused (not aborted) when
/// the count overflows or exceeds the memory available.
pub fn zeros(dims: &[usize], what: &str) -> Result<Vec<f32>, Refusal> {
    let len = product(dims);
    ensure(f32_bytes(len), what)?;
    let len = len.expect("ensure refuses an overflowed count");
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Refusal::TooLarge(format!("{what}: cannot allocate {}", gib(len as u64 * 4))))?;
    v.resize(len, 0.0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflowing_and_oversized_requests_are_refused_with_the_figures() {
        assert_eq!(product(&[1 << 32, 1 << 32]), None);
        assert_eq!(product(&[3, 0, usize::MAX]), Some(0));
        assert!(matches!(zeros(&[1 << 32, 1 << 32], "x"), Err(Refusal::Overflow(_))));
        let err = zeros(&[1 << 50], "the test buffer").unwrap_err();
        assert!(matches!(err, Refusal::TooLarge(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.starts_with("the test buffer needs 4194304.0 GiB but only") && msg.ends_with("GiB of memory is available"), "{msg}");
        assert_eq!(zeros(&[2, 3], "x").unwrap(), vec![0.0; 6]);
        assert!(available_bytes().unwrap() > 0);
    }
}
