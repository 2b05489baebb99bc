//! The step planner: how a step's sequences and the machine's cores are
//! divided among the worker spheres. Pure code (no threads), so the plan of
//! every machine size can be checked in `cargo test`.
//!
//! The spheres work in lanes: a lane is a gradient buffer, activations and a
//! team of cores. Worker sphere s works in lane (s - 1) % lanes; the spheres
//! of a lane take turns, each running its micro-batches' kernels on the
//! lane's whole team. With fewer cores than worker spheres every team is one
//! core and several spheres share it (12 threads on 2 cores: 2 lanes); with
//! more, every sphere has a lane of its own and the cores are divided into
//! teams (11 workers on 16 cores: 5 teams of 2 and 6 of 1).
//!
//! Node Zero's core joins a team: Node Zero deals and routes before the
//! spheres start and reduces and applies AdamW after they finish (on the
//! whole pool), so a core kept for it would idle through the whole of the
//! spheres' work.
//!
//! Time is counted in sequence-units: what one core takes for the forward
//! and backward pass of one sequence. A lane whose team has k cores and
//! runs w sequences takes w / k; the step's critical path is its slowest
//! lane's, against the ideal B / cores.

use crate::train::{lane_of, MicroBatch};
use std::cmp::{Ordering, Reverse};

/// A plan within this factor (11/10) of the ideal critical path counts as
/// balanced; among balanced plans the planner takes the most lanes, since
/// smaller teams spend less of their time in the kernels' serial parts.
const BALANCED: (u128, u128) = (11, 10);

/// The lanes of a step: each one's team of cores and its share of sequences.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Teams {
    /// Cores of each lane's team.
    pub cores: Vec<usize>,
    /// Sequences each lane runs in a step.
    pub quota: Vec<usize>,
}

/// w / k compared with w' / k' without rounding.
fn ratio_cmp(a: (usize, usize), b: (usize, usize)) -> Ordering {
    (a.0 as u128 * b.1 as u128).cmp(&(b.0 as u128 * a.1 as u128))
}

impl Teams {
    pub fn lanes(&self) -> usize {
        self.cores.len()
    }

    /// The slowest lane's (sequences, cores): its time in sequence-units is
    /// their ratio.
    pub fn critical_path(&self) -> (usize, usize) {
        self.quota
            .iter()
            .zip(&self.cores)
            .map(|(&w, &k)| (w, k))
            .max_by(|&a, &b| ratio_cmp(a, b))
            .unwrap_or((0, 1))
    }

    /// First core (in the order of the CPUs the trainer may use) of each team.
    pub fn first_cores(&self) -> Vec<usize> {
        self.cores.iter().scan(0, |next, &k| Some(std::mem::replace(next, *next + k))).collect()
    }
}

/// Worker spheres of a pool of `threads` threads (Node Zero computes alone
/// when it is the only thread).
pub fn workers(threads: usize) -> usize {
    if threads <= 1 {
        1
    } else {
        threads - 1
    }
}

/// Plan the lanes of a step of `b` sequences of `t` tokens for `threads`
/// sphere threads on `cores` cores: as many lanes as cores, worker spheres
/// and sequences allow, fewer only when that brings the critical path
/// within 10% of the ideal (or to the best any lane count reaches). Every
/// core joins a team with work, unless a team would get more cores than its
/// sequences have tokens (then the rest idle).
pub fn teams(cores: usize, threads: usize, b: usize, t: usize) -> Teams {
    let (cores, b, t) = (cores.max(1), b.max(1), t.max(1));
    let most = cores.min(workers(threads)).min(b);
    let plans: Vec<Teams> = (1..=most).map(|lanes| plan_lanes(lanes, cores, b, t)).collect();
    let best = plans.iter().map(Teams::critical_path).min_by(|&a, &c| ratio_cmp(a, c)).expect("one lane at least");
    let balanced = |(w, k): (usize, usize)| BALANCED.1 * cores as u128 * w as u128 <= BALANCED.0 * b as u128 * k as u128;
    plans
        .into_iter()
        .rev()
        .find(|p| balanced(p.critical_path()) || ratio_cmp(p.critical_path(), best) != Ordering::Greater)
        .expect("the best plan qualifies")
}

/// The better of two plans for exactly `lanes` lanes: teams as even as the
/// cores allow with the sequences shared in proportion, or the sequences as
/// even as they allow with the cores shared in proportion (the first when
/// they tie).
fn plan_lanes(lanes: usize, cores: usize, b: usize, t: usize) -> Teams {
    let even_cores = share(cores, lanes);
    let quota = share_work(b, &even_cores);
    let capped: Vec<usize> = even_cores.iter().zip(&quota).map(|(&k, &w)| k.min(w.saturating_mul(t))).collect();
    let a = Teams { cores: capped, quota };
    let even_work = share(b, lanes);
    let c = Teams { cores: share_cores(cores, &even_work, t), quota: even_work };
    if ratio_cmp(c.critical_path(), a.critical_path()) == Ordering::Less {
        c
    } else {
        a
    }
}

/// `total` split into `parts` shares differing by at most one, larger first.
fn share(total: usize, parts: usize) -> Vec<usize> {
    (0..parts).map(|i| total / parts + usize::from(i < total % parts)).collect()
}

/// `b` sequences over lanes with these team sizes, at least one each,
/// minimising the largest sequences-per-core. The greedy gives each next
/// sequence to the lane it slows least, from a proportional start below
/// the optimum, so it ends at the optimum.
fn share_work(b: usize, cores: &[usize]) -> Vec<usize> {
    let lanes = cores.len();
    let sum: usize = cores.iter().sum();
    let mut w: Vec<usize> = cores.iter().map(|&k| ((b - lanes) as u128 * k as u128 / sum as u128) as usize).map(|w| w.max(1)).collect();
    for _ in w.iter().sum::<usize>()..b {
        let l = (0..lanes).min_by(|&i, &j| ratio_cmp((w[i] + 1, cores[i]), (w[j] + 1, cores[j])).then(i.cmp(&j))).expect("a lane");
        w[l] += 1;
    }
    w
}

/// `cores` over lanes with these sequence counts, at least one each and at
/// most one per token (`t` per sequence), minimising the largest
/// sequences-per-core: each next core goes to the slowest lane.
fn share_cores(cores: usize, work: &[usize], t: usize) -> Vec<usize> {
    let lanes = work.len();
    let sum: usize = work.iter().sum();
    let cap = |l: usize| work[l].saturating_mul(t);
    let mut k: Vec<usize> =
        (0..lanes).map(|l| (((cores - lanes) as u128 * work[l] as u128 / sum as u128) as usize).clamp(1, cap(l))).collect();
    for _ in k.iter().sum::<usize>()..cores {
        let open = (0..lanes).filter(|&l| k[l] < cap(l));
        let Some(l) = open.max_by(|&i, &j| ratio_cmp((work[i], k[i]), (work[j], k[j])).then(j.cmp(&i))) else { break };
        k[l] += 1;
    }
    k
}

/// Route a step's micro-batches to the spheres under `teams`.
///
/// First the micro-batches go whole, largest first, to the lane they leave
/// least loaded per core (lowest index on ties); when that reaches the
/// plan's critical path nothing is split. Otherwise each lane is filled to
/// its quota: a micro-batch goes whole to the fullest lane it fits in, and
/// one that fits nowhere is split, its first sequences filling the emptiest
/// lane. Within a lane the pieces go largest first to its least-loaded
/// sphere (lowest index on ties). Returns, per sphere, the micro-batches
/// (whole or pieces) it runs, in group order.
pub fn route(mbs: &[MicroBatch], teams: &Teams, threads: usize) -> Vec<Vec<MicroBatch>> {
    let lanes = teams.lanes();
    let size = |mb: &MicroBatch| mb.sequences.len();
    let mut order: Vec<&MicroBatch> = mbs.iter().collect();
    order.sort_by_key(|mb| (Reverse(size(mb)), mb.group));
    let mut load = vec![0usize; lanes];
    let mut lane_mbs: Vec<Vec<MicroBatch>> = vec![Vec::new(); lanes];
    for mb in &order {
        let l = (0..lanes)
            .min_by(|&i, &j| ratio_cmp((load[i] + size(mb), teams.cores[i]), (load[j] + size(mb), teams.cores[j])).then(i.cmp(&j)))
            .expect("a lane");
        load[l] += size(mb);
        lane_mbs[l].push((*mb).clone());
    }
    let slowest = (0..lanes).map(|l| (load[l], teams.cores[l])).max_by(|&a, &b| ratio_cmp(a, b));
    if slowest.is_some_and(|s| ratio_cmp(s, teams.critical_path()) == Ordering::Greater) {
        let mut room = teams.quota.clone();
        lane_mbs = vec![Vec::new(); lanes];
        for mb in &order {
            let mut rest = &mb.sequences[..];
            while !rest.is_empty() {
                let fits = (0..lanes).filter(|&l| room[l] >= rest.len()).min_by_key(|&l| (room[l], l));
                let l = fits.unwrap_or_else(|| (0..lanes).max_by_key(|&l| (room[l], Reverse(l))).expect("a lane"));
                let take = rest.len().min(room[l]);
                room[l] -= take;
                lane_mbs[l].push(MicroBatch { group: mb.group, sequences: rest[..take].to_vec() });
                rest = &rest[take..];
            }
        }
        for pieces in &mut lane_mbs {
            pieces.sort_by_key(|p| (Reverse(size(p)), p.group));
        }
    }
    let mut plan = vec![Vec::new(); threads.max(1)];
    let mut sphere_load = vec![0usize; threads.max(1)];
    for (l, pieces) in lane_mbs.into_iter().enumerate() {
        let members: Vec<usize> = (0..threads.max(1)).filter(|&s| lane_of(s, threads, lanes) == Some(l)).collect();
        for piece in pieces {
            let s = *members.iter().min_by_key(|&&s| (sphere_load[s], s)).expect("every lane has a sphere");
            sphere_load[s] += size(&piece);
            plan[s].push(piece);
        }
    }
    for p in &mut plan {
        p.sort_by_key(|mb| (mb.group, mb.sequences[0]));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::deal;

    /// The least critical path (sequences, cores) that any split of `b`
    /// whole sequences over at most `lanes` lanes and `cores` cores reaches:
    /// found independently of the planner, by a search over every ratio
    /// with a knapsack of cores per lane.
    fn best_possible(cores: usize, lanes: usize, b: usize) -> (usize, usize) {
        let mut ratios: Vec<(usize, usize)> = (1..=b).flat_map(|w| (1..=cores).map(move |k| (w, k))).collect();
        ratios.sort_by(|&x, &y| ratio_cmp(x, y));
        // the most sequences n lanes (n <= lanes) can hold at ratio (p, q) with all cores
        let holds = |(p, q): (usize, usize)| {
            let mut most = vec![None; cores + 1]; // cores used -> sequences held
            most[0] = Some(0usize);
            let mut best = 0;
            for _ in 0..lanes {
                let mut next = vec![None; cores + 1];
                for used in 0..=cores {
                    let Some(held) = most[used] else { continue };
                    for k in 1..=cores - used {
                        let w = k * p / q;
                        if w >= 1 {
                            let cell: &mut Option<usize> = &mut next[used + k];
                            *cell = Some(cell.map_or(held + w, |c| c.max(held + w)));
                        }
                    }
                }
                best = best.max(next[cores].unwrap_or(0));
                most = next;
            }
            best >= b
        };
        let (mut lo, mut hi) = (0, ratios.len() - 1);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if holds(ratios[mid]) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        ratios[lo]
    }

    #[test]
    fn every_core_works_and_the_critical_path_is_within_ten_percent_of_ideal_or_the_best_possible() {
        let (threads, t) = (12, 128);
        println!("cores     B  lanes  teams (cores per lane)                       critical  ideal  ratio");
        for cores in [2, 4, 8, 12, 16, 32, 64, 128] {
            for b in [8, 16, 32, 64, 256] {
                let plan = teams(cores, threads, b, t);
                assert_eq!(plan.quota.iter().sum::<usize>(), b, "{cores} cores, B={b}: {plan:?}");
                assert!(plan.quota.iter().all(|&w| w >= 1), "a lane without work: {plan:?}");
                assert!(plan.lanes() <= workers(threads));
                // every core is in a team that has work (B x T allows it everywhere here)
                assert!(b * t >= cores);
                assert_eq!(plan.cores.iter().sum::<usize>(), cores, "{cores} cores, B={b}: {plan:?}");
                let (w, k) = plan.critical_path();
                let within = 10 * cores * w <= 11 * b * k;
                let best = best_possible(cores, workers(threads), b);
                assert!(within || ratio_cmp((w, k), best) != Ordering::Greater, "{cores} cores, B={b}: {plan:?} vs {best:?}");
                let path = w as f64 / k as f64;
                let ideal = b as f64 / cores as f64;
                println!("{cores:5} {b:5} {:6}  {:44} {path:8.3} {ideal:6.3} {:6.3}", plan.lanes(), format!("{:?}", plan.cores), path / ideal);
            }
        }
    }

    #[test]
    fn the_two_core_default_keeps_a_lane_per_core_and_twelve_cores_of_eight_sequences_make_teams_of_three() {
        assert_eq!(teams(2, 12, 16, 128), Teams { cores: vec![1, 1], quota: vec![8, 8] });
        assert_eq!(teams(2, 12, 15, 128).cores, vec![1, 1]); // 8 against 7.5: within 10%
        assert_eq!(teams(2, 12, 3, 128), Teams { cores: vec![2], quota: vec![3] }); // 1.5 instead of 2
        assert_eq!(teams(12, 12, 8, 128), Teams { cores: vec![3; 4], quota: vec![2; 4] });
        assert_eq!(teams(16, 12, 32, 128).cores, [vec![2; 5], vec![1; 6]].concat());
        // one worker takes every core; one token per core at most
        assert_eq!(teams(8, 2, 5, 128), Teams { cores: vec![8], quota: vec![5] });
        assert_eq!(teams(8, 1, 1, 3), Teams { cores: vec![3], quota: vec![1] });
    }

    fn pieces_cover_the_batch(plan: &[Vec<MicroBatch>], mbs: &[MicroBatch]) {
        let mut seen: Vec<(usize, usize)> = plan.iter().flatten().flat_map(|p| p.sequences.iter().map(move |&s| (p.group, s))).collect();
        let mut want: Vec<(usize, usize)> = mbs.iter().flat_map(|m| m.sequences.iter().map(move |&s| (m.group, s))).collect();
        seen.sort_unstable();
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn routing_meets_the_plan_and_splits_a_group_only_when_balance_needs_it() {
        for (cores, threads, b) in [(2, 12, 16), (8, 12, 32), (16, 12, 32), (128, 12, 64), (12, 12, 8), (3, 4, 7), (5, 1, 9)] {
            let firsts: Vec<u32> = (0..b as u32).map(|i| i * 5 % 24).collect();
            let mbs = deal(&firsts, 7);
            let plan = teams(cores, threads, b, 64);
            let routed = route(&mbs, &plan, threads);
            pieces_cover_the_batch(&routed, &mbs);
            let mut load = vec![0; plan.lanes()];
            for (s, pieces) in routed.iter().enumerate() {
                if !pieces.is_empty() {
                    load[lane_of(s, threads, plan.lanes()).expect("work goes to spheres with lanes")] += pieces.iter().map(|p| p.sequences.len()).sum::<usize>();
                }
            }
            let slowest = (0..plan.lanes()).map(|l| (load[l], plan.cores[l])).max_by(|&a, &b| ratio_cmp(a, b)).unwrap();
            assert_ne!(ratio_cmp(slowest, plan.critical_path()), Ordering::Greater, "{cores} cores, B={b}: {load:?} {plan:?}");
            let pieces = routed.iter().flatten().count();
            // 2 cores: every group whole, as before teams; 8 cores, B=32: 3+3+3+... needs splits
            if cores == 2 {
                assert_eq!(pieces, mbs.len());
            }
            if (cores, b) == (8, 32) {
                assert!(pieces > mbs.len());
            }
            if threads > 1 {
                assert!(routed[0].is_empty(), "Node Zero runs no micro-batch");
            }
        }
    }

    #[test]
    fn routing_keeps_the_pre_team_plan_on_one_core_per_lane() {
        // whole micro-batches, largest first to the least-loaded lane, then to
        // the least-loaded sphere of the lane: 4 groups of 2, 8 of 1 on 2 lanes
        let mbs = deal(&[5u32; 16], 0);
        let routed = route(&mbs, &teams(2, 12, 16, 8), 12);
        let groups: Vec<Vec<usize>> = routed.iter().map(|p| p.iter().map(|m| m.group).collect()).collect();
        let want: Vec<Vec<usize>> = vec![vec![], vec![0], vec![1], vec![2], vec![3], vec![4], vec![5, 11], vec![6], vec![7], vec![8], vec![9], vec![10]];
        assert_eq!(groups, want);
    }
}
