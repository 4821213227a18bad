//! How many threads this process should use by default: one per physical core that it may
//! actually run on.
//!
//! Three limits apply, and the smallest wins: the CPUs in the process's affinity mask
//! (`taskset`, a container's cpuset), the CPU quota of its cgroup (`docker --cpus 2`), both
//! of which `std::thread::available_parallelism` reads, and the physical cores among the
//! allowed CPUs: two hyper-threads of one core share its SIMD units, and a second thread per
//! core only adds barrier waits to a memory-bound decode.

use std::collections::BTreeSet;

/// The default thread count: physical cores among the CPUs this process may use, capped by
/// its cgroup's CPU quota; at least 1.
pub fn default_threads() -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(|list| parse_cpu_list(list.trim()))
        });
    let cores = match allowed {
        Some(cpus) => physical_cores_of(&cpus, |cpu| {
            let dir = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
            let read = |name: &str| {
                std::fs::read_to_string(format!("{dir}/{name}"))
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            Some((read("physical_package_id")?, read("core_id")?))
        }),
        None => None,
    };
    cores.unwrap_or(available).min(available).max(1)
}

/// Parses a Linux CPU list such as `0-3,8,10-11`; `None` when it is malformed.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                // A bound keeps a hostile list from allocating without end.
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Distinct (package, core) pairs among `cpus`, given each CPU's topology; `None` when the
/// topology of any of them is unknown.
pub fn physical_cores_of(
    cpus: &[usize],
    topology: impl Fn(usize) -> Option<(u64, u64)>,
) -> Option<usize> {
    let mut cores = BTreeSet::new();
    for &cpu in cpus {
        cores.insert(topology(cpu)?);
    }
    Some(cores.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_linux_writes_them() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0-1,4,6-7"), Some(vec![0, 1, 4, 6, 7]));
        for bad in ["", "a", "3-1", "0-", "1,,x", "0-99999999"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hyper_threads_of_one_core_count_once() {
        // 4 cores with 2 threads each: CPU c and c + 4 are siblings.
        let smt = |cpu: usize| Some((0, (cpu % 4) as u64));
        assert_eq!(physical_cores_of(&[0, 1, 2, 3, 4, 5, 6, 7], smt), Some(4));
        // An affinity mask of two siblings is one core.
        assert_eq!(physical_cores_of(&[1, 5], smt), Some(1));
        assert_eq!(physical_cores_of(&[0, 1, 5], smt), Some(2));
        // Two packages with equal core ids are distinct cores.
        let two_sockets = |cpu: usize| Some(((cpu / 2) as u64, (cpu % 2) as u64));
        assert_eq!(physical_cores_of(&[0, 1, 2, 3], two_sockets), Some(4));
        assert_eq!(
            physical_cores_of(&[0, 9], |c| (c < 4).then_some((0, 0))),
            None
        );
    }

    #[test]
    fn the_default_is_within_what_the_process_may_use() {
        let n = default_threads();
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(
            n >= 1 && n <= available,
            "{n} threads of {available} available"
        );
    }
}
