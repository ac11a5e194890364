//! What this worker offers the head's placement: device kind and count, memory, CPU cores.
//!
//! On the CPU the "device" is the host: one device whose memory is the host's total memory
//! (`MemTotal` of `/proc/meminfo`, 0 where that file is missing), and `cpu_cores` is the
//! parallelism the OS grants this process. A build with the `cuda` feature on a machine whose
//! driver reports GPUs offers those instead (`cuda`, their count, the first one's memory), so
//! the head places GPU replicas here (`service::devices` says which GPU each one gets).

use lumen_proto::v1 as pb;

/// The resources of this machine when it serves on the CPU.
pub fn detect_resources() -> pb::Resources {
    let host_memory_bytes =
        std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| mem_total_bytes(&s)).unwrap_or(0);
    let cpu_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = pb::Resources {
        device_kind: "cpu".into(),
        device_count: 1,
        device_memory_bytes: host_memory_bytes,
        cpu_cores: u32::try_from(cpu_cores).unwrap_or(u32::MAX),
        host_memory_bytes,
    };
    match gpus() {
        Some((count, memory)) if count > 0 => {
            pb::Resources { device_kind: "cuda".into(), device_count: count, device_memory_bytes: memory, ..cpu }
        }
        _ => cpu,
    }
}

/// The GPUs the driver reports and the first one's memory; `None` without the `cuda` feature
/// or a driver.
#[cfg(feature = "cuda")]
fn gpus() -> Option<(u32, u64)> {
    use cudarc::driver::result;
    result::init().ok()?;
    let count = u32::try_from(result::device::get_count().ok()?).ok()?;
    let memory = match count {
        0 => 0,
        // SAFETY: the driver is initialised and device 0 exists.
        _ => unsafe { result::device::total_mem(result::device::get(0).ok()?).ok()? as u64 },
    };
    Some((count, memory))
}

#[cfg(not(feature = "cuda"))]
fn gpus() -> Option<(u32, u64)> {
    None
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    let unit = match fields.next() {
        None => 1,
        Some(u) if u.eq_ignore_ascii_case("kb") => 1024,
        Some(u) if u.eq_ignore_ascii_case("mb") => 1024 * 1024,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total_in_kibibytes() {
        let text = "MemTotal:       24522340 kB\nMemFree:         1234 kB\n";
        assert_eq!(mem_total_bytes(text), Some(24522340 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn the_cpu_is_one_device_with_the_hosts_memory() {
        let r = detect_resources();
        assert_eq!(r.device_kind, "cpu");
        assert_eq!(r.device_count, 1);
        assert!(r.cpu_cores >= 1);
        assert_eq!(r.device_memory_bytes, r.host_memory_bytes);
        if std::path::Path::new("/proc/meminfo").is_file() {
            assert!(r.host_memory_bytes > 0);
        }
    }
}
