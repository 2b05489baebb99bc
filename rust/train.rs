//! The kissing-sphere trainer: one optimizer step of a GPT-2 model on a rayon
//! pool of N threads laid out as spheres.
//!
//! Sphere 0 is Node Zero, the control thread: it deals each step's sequences
//! into the 12 symmetry groups, routes the groups' micro-batches to the worker
//! spheres 1..N-1, reduces their gradients in a fixed order and applies AdamW.
//! Each worker sphere runs forward and backward passes of its micro-batches on
//! its own thread, writing gradients only into memory it owns: the lane (a
//! core's gradient buffer and activations) it holds while it computes. With
//! one thread, Node Zero does everything.
//!
//! Determinism: the deal, the routing (a longest-first plan over the spheres),
//! the lanes' turn order and the reduction order depend only on the batch, the
//! thread count and the lane count (the machine's cores), so the same inputs
//! give bit-identical results. Another thread or core count sums the same
//! gradients in another grouping, which changes results only by float
//! rounding.

use crate::kernels::adamw::AdamW;
use crate::model::{Activations, Config, Gpt2};
use crate::optim::{global_norm, Optimizer};
use rayon::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Every token id belongs to symmetry group `id % SYMMETRY_GROUPS`.
pub const SYMMETRY_GROUPS: usize = 12;

/// The most threads a pool may have: far more than any machine's cores,
/// few enough that their stacks fit in memory.
pub const MAX_THREADS: usize = 1024;

/// Elements per parallel chunk in the reduction, clipping and norm.
const CHUNK: usize = 1 << 15;

/// The sequences of one symmetry group in one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicroBatch {
    pub group: usize,
    pub sequences: Vec<usize>,
}

/// Deal the `b` sequences of a step into the 12 groups.
///
/// `dealt` counts sequences dealt earlier in the epoch: slot k of this step
/// belongs to group (dealt + k) % 12, so over an epoch every group receives
/// the same number of sequences within one, whatever the tokens. Within a
/// step a sequence goes to the group of its first token (`first_tokens[i] %
/// 12`) while that group has a free slot; the rest fill the remaining slots
/// in order.
pub fn deal(first_tokens: &[u32], dealt: u64) -> Vec<MicroBatch> {
    let b = first_tokens.len();
    let mut free = [0usize; SYMMETRY_GROUPS];
    for k in 0..b {
        free[((dealt + k as u64) % SYMMETRY_GROUPS as u64) as usize] += 1;
    }
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); SYMMETRY_GROUPS];
    let mut rest = Vec::new();
    for (i, &tok) in first_tokens.iter().enumerate() {
        let g = tok as usize % SYMMETRY_GROUPS;
        if free[g] > 0 {
            free[g] -= 1;
            groups[g].push(i);
        } else {
            rest.push(i);
        }
    }
    let mut rest = rest.into_iter();
    for g in 0..SYMMETRY_GROUPS {
        for _ in 0..free[g] {
            groups[g].push(rest.next().expect("slots equal sequences"));
        }
        groups[g].sort_unstable();
    }
    groups
        .into_iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(group, sequences)| MicroBatch { group, sequences })
        .collect()
}

/// The lane a sphere works in: worker sphere s in lane (s - 1) % lanes; with
/// one thread Node Zero works in lane 0. Node Zero has no lane otherwise.
pub fn lane_of(sphere: usize, threads: usize, lanes: usize) -> Option<usize> {
    if threads <= 1 {
        return (sphere == 0).then_some(0);
    }
    (sphere >= 1).then(|| (sphere - 1) % lanes.max(1))
}

/// Route micro-batches to spheres: largest first to the least-loaded lane,
/// then within each lane largest first to its least-loaded sphere (lowest
/// index on ties), so lanes finish together and no sphere idles while
/// another of its lane has two or more queued. Returns, per sphere, the
/// indices into `mbs` it runs, in group order.
pub fn route(mbs: &[MicroBatch], threads: usize, lanes: usize) -> Vec<Vec<usize>> {
    let (threads, lanes) = (threads.max(1), lanes.max(1));
    let mut order: Vec<usize> = (0..mbs.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(mbs[i].sequences.len()), mbs[i].group));
    let mut lane_load = vec![0usize; lanes];
    let mut lane_mbs = vec![Vec::new(); lanes];
    for i in order {
        let l = (0..lanes).min_by_key(|&l| (lane_load[l], l)).expect("a lane");
        lane_load[l] += mbs[i].sequences.len();
        lane_mbs[l].push(i);
    }
    let mut plan = vec![Vec::new(); threads];
    let mut load = vec![0usize; threads];
    for (l, queue) in lane_mbs.iter().enumerate() {
        let members: Vec<usize> = (0..threads).filter(|&s| lane_of(s, threads, lanes) == Some(l)).collect();
        for &i in queue {
            let s = *members.iter().min_by_key(|&&s| (load[s], s)).expect("every lane has a sphere");
            load[s] += mbs[i].sequences.len();
            plan[s].push(i);
        }
    }
    for p in &mut plan {
        p.sort_by_key(|&i| mbs[i].group);
    }
    plan
}

/// What one sphere did in one step.
#[derive(Clone, Debug, Default)]
pub struct SphereReport {
    pub micro_batches: usize,
    pub sequences: usize,
    pub loss_sum: f64, // summed token losses of its micro-batches
    pub tokens: usize,
    pub busy_s: f64,
}

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub loss: f64,
    pub grad_norm: f64,
    pub group_sequences: [usize; SYMMETRY_GROUPS],
    pub spheres: Vec<SphereReport>,
    pub compute_s: f64,
    pub step_s: f64,
}

/// The working memory of one core: a gradient buffer and activations.
///
/// A machine has as many lanes as cores (at most one per worker sphere).
/// Each worker sphere is given a lane and, when it is its turn, owns the
/// lane's memory while it runs its micro-batches. With a core per sphere this
/// is simply each sphere's own memory; with 12 spheres on 2 cores the spheres
/// of a lane take turns in a fixed order instead of time-slicing the cores,
/// so memory and gradient traffic scale with the cores, not the spheres, and
/// the sums stay deterministic.
struct Lane {
    mem: Mutex<LaneMem>,
    turn: Mutex<usize>,
    wake: Condvar,
}

struct LaneMem {
    grads: Vec<f32>,
    acts: Option<Activations>,
}

/// What `run_spheres` did: the micro-batches, which spheres ran in which
/// lane, and each sphere's report.
struct SphereRun {
    mbs: Vec<MicroBatch>,
    lane_plan: Vec<Vec<usize>>,
    reports: Vec<SphereReport>,
}

/// Training hyper-parameters that stay fixed over a run.
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub adamw: AdamW,
    /// Clip the gradient's global norm to this; 0 disables clipping.
    pub grad_clip: f32,
}

impl Hyper {
    /// Refuse settings that cannot train: AdamW's own checks and the clip.
    pub fn validate(&self) -> Result<(), String> {
        self.adamw.validate()?;
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return Err(format!("grad_clip must be a finite number >= 0, got {}", self.grad_clip));
        }
        Ok(())
    }
}

/// Refuse a thread count no pool can have.
pub fn check_threads(threads: usize) -> Result<(), String> {
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(format!("threads must be between 1 and {MAX_THREADS}, got {threads}"));
    }
    Ok(())
}

/// Worker spheres of a pool of `threads` threads (Node Zero computes alone
/// when it is the only thread).
fn workers(threads: usize) -> usize {
    if threads <= 1 {
        1
    } else {
        threads - 1
    }
}

/// Cores this process may run on.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Lanes of working memory a trainer of `threads` threads keeps on a
/// machine of `cores` cores: one per core, at most one per worker sphere.
pub fn lanes_for(threads: usize, cores: usize) -> usize {
    cores.clamp(1, workers(threads))
}

/// Bytes a trainer allocates to train `config` on batches of `batch`
/// sequences of `seq_len` tokens: the weights and two AdamW moments once,
/// then for each lane that gets work a gradient buffer and the activations
/// of the largest symmetry group's micro-batch. None when it overflows.
pub fn training_bytes(config: &Config, batch: usize, seq_len: usize, threads: usize, cores: usize) -> Option<u64> {
    let params = config.checked_num_parameters()?;
    let lanes = lanes_for(threads, cores).min(SYMMETRY_GROUPS).min(batch.max(1));
    let micro = batch.div_ceil(SYMMETRY_GROUPS);
    let per_lane = params.checked_add(Activations::floats(config, micro, seq_len)?)?;
    let floats = params.checked_mul(3)?.checked_add(lanes.checked_mul(per_lane)?)?;
    (floats as u64).checked_mul(std::mem::size_of::<f32>() as u64)
}

/// Why a step was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum StepError {
    /// The batch is malformed (shape, token range); nothing ran.
    BadBatch(String),
    /// The loss or gradient was NaN or infinite; the parameters are unchanged.
    NonFinite { loss: f64, grad_norm: f64 },
    /// A sphere failed (a bug); the step ended without changing the parameters.
    SphereFailed(String),
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::BadBatch(msg) => write!(f, "{msg}"),
            StepError::NonFinite { loss, grad_norm } => {
                write!(f, "non-finite loss ({loss}) or gradient norm ({grad_norm}); parameters left unchanged")
            }
            StepError::SphereFailed(msg) => write!(f, "{msg}; parameters left unchanged"),
        }
    }
}

pub struct Trainer {
    pub model: Gpt2,
    pub opt: Optimizer,
    pub hyper: Hyper,
    /// Sequences dealt so far in the current epoch.
    pub dealt: u64,
    threads: usize,
    pool: rayon::ThreadPool,
    lanes: Vec<Lane>,
    /// Held while spheres run, so two calls never share the lanes.
    running: Mutex<()>,
    /// The largest (micro-batch, T) whose activations were checked against
    /// the memory available; larger ones are checked before they allocate.
    planned: Mutex<(usize, usize)>,
    /// A sphere that panics on purpose, to test that a panic ends the step.
    #[cfg(test)]
    panic_sphere: Option<usize>,
}

/// Lock a mutex even if a panicking sphere poisoned it: every buffer behind
/// one is rewritten before it is read again.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Trainer {
    /// A trainer with one lane per core (at most one per worker sphere).
    pub fn new(model: Gpt2, hyper: Hyper, threads: usize) -> Result<Self, String> {
        Self::with_lanes(model, hyper, threads, available_cores())
    }

    /// A trainer with at most `lanes` lanes of working memory.
    pub fn with_lanes(model: Gpt2, hyper: Hyper, threads: usize, lanes: usize) -> Result<Self, String> {
        check_threads(threads)?;
        hyper.validate()?;
        let workers = workers(threads);
        let lanes = lanes_for(threads, lanes);
        // Keep each lane's spheres on one core, so a sphere woken for its
        // turn starts at once where its predecessor just finished.
        let cores = affinity::allowed_cpus();
        let pin = lanes <= cores.len() && lanes < workers;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| if i == 0 { "node-zero".into() } else { format!("sphere-{i}") })
            .start_handler(move |i| {
                if let (true, Some(l)) = (pin, lane_of(i, threads, lanes)) {
                    affinity::pin_current_thread(cores[l]);
                }
            })
            .build()
            .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
        // Buffers are allocated on first use, so unused lanes cost nothing.
        let lanes = (0..lanes)
            .map(|_| Lane {
                mem: Mutex::new(LaneMem { grads: Vec::new(), acts: None }),
                turn: Mutex::new(0),
                wake: Condvar::new(),
            })
            .collect();
        let opt = Optimizer::new(&model.layout);
        Ok(Trainer {
            model,
            opt,
            hyper,
            dealt: 0,
            threads,
            pool,
            lanes,
            running: Mutex::new(()),
            planned: Mutex::new((0, 0)),
            #[cfg(test)]
            panic_sphere: None,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run every micro-batch of a [B, T+1] batch on the spheres. With
    /// `backward`, the gradient buffer of each lane listed in the returned
    /// lane plan holds the sum over its spheres' micro-batches of
    /// d(mean batch loss)/dparams.
    fn run_spheres(&self, batch: &[u32], b: usize, t: usize, backward: bool) -> Result<SphereRun, String> {
        let firsts: Vec<u32> = (0..b).map(|i| batch[i * (t + 1)]).collect();
        let mbs = deal(&firsts, self.dealt);
        let lanes = self.lanes.len();
        let plan = route(&mbs, self.threads, lanes);
        // Each lane's spheres with work, in the order they take their turns.
        let mut lane_plan = vec![Vec::new(); lanes];
        for s in (0..self.threads).filter(|&s| !plan[s].is_empty()) {
            lane_plan[lane_of(s, self.threads, lanes).expect("work goes to spheres with lanes")].push(s);
        }
        let mut slot = vec![None; self.threads];
        for (l, spheres) in lane_plan.iter().enumerate() {
            for (k, &s) in spheres.iter().enumerate() {
                slot[s] = Some((l, k));
            }
        }
        let dloss = 1.0 / (b * t) as f32;
        let model = &self.model;
        let _running = lock(&self.running);
        for lane in &self.lanes {
            *lock(&lane.turn) = 0;
        }
        let results = self.pool.broadcast(|ctx| {
            let me = ctx.index();
            let Some((l, k)) = slot[me] else { return Ok(SphereReport::default()) };
            let lane = &self.lanes[l];
            let mut turn = lock(&lane.turn);
            while *turn != k {
                turn = lane.wake.wait(turn).unwrap_or_else(PoisonError::into_inner);
            }
            drop(turn);
            let start = Instant::now();
            // A panic must not leave the lane's later spheres waiting for a
            // turn that never comes: catch it, pass the turn on, report it.
            let result = catch_unwind(AssertUnwindSafe(|| {
                #[cfg(test)]
                assert!(self.panic_sphere != Some(me), "sphere {me} panics as the test asked");
                let mut report = SphereReport::default();
                let mut mem = lock(&lane.mem);
                let LaneMem { grads, acts } = &mut *mem;
                if backward && k == 0 {
                    grads.resize(model.layout.total, 0.0);
                    grads.fill(0.0);
                }
                for &i in &plan[me] {
                    let seqs = &mbs[i].sequences;
                    let m = seqs.len();
                    let mut x = Vec::with_capacity(m * t);
                    let mut y = Vec::with_capacity(m * t);
                    for &s in seqs {
                        let row = &batch[s * (t + 1)..(s + 1) * (t + 1)];
                        x.extend_from_slice(&row[..t]);
                        y.extend_from_slice(&row[1..]);
                    }
                    let acts = match acts {
                        Some(a) => {
                            a.fit(&model.config, m, t);
                            a
                        }
                        None => acts.insert(Activations::new(&model.config, m, t)),
                    };
                    let g = if backward { Some(&mut grads[..]) } else { None };
                    report.loss_sum += model.loss_sum(acts, &x, &y, g, dloss, 1);
                    report.micro_batches += 1;
                    report.sequences += m;
                    report.tokens += m * t;
                }
                report
            }));
            *lock(&lane.turn) += 1;
            lane.wake.notify_all();
            result
                .map(|mut report| {
                    report.busy_s = start.elapsed().as_secs_f64();
                    report
                })
                .map_err(|payload| format!("sphere {me} failed: {}", panic_message(&*payload)))
        });
        let reports = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(SphereRun { mbs, lane_plan, reports })
    }

    fn check(&self, batch: &[u32], b: usize, t: usize) -> Result<(), String> {
        if batch.len() != b * (t + 1) {
            return Err(format!("batch has {} ids, expected B*(T+1) = {}", batch.len(), b * (t + 1)));
        }
        if b == 0 || t == 0 {
            return Err(format!("batch must have at least one sequence of one token, got [{b}, {}]", t + 1));
        }
        // Inputs are columns 0..T and targets 1..T+1 of each row.
        let x: Vec<u32> = batch.chunks(t + 1).flat_map(|r| r[..t].to_vec()).collect();
        let y: Vec<u32> = batch.chunks(t + 1).flat_map(|r| r[1..].to_vec()).collect();
        self.model.check_batch(&x, Some(&y), b, t)?;
        self.plan_memory(b, t)
    }

    /// Refuse a batch whose micro-batches need more activation memory than
    /// the machine has, before any sphere allocates it. Checked once per
    /// larger shape (the lanes keep their buffers for smaller ones).
    fn plan_memory(&self, b: usize, t: usize) -> Result<(), String> {
        let micro = b.div_ceil(SYMMETRY_GROUPS);
        let mut planned = lock(&self.planned);
        if micro <= planned.0 && t <= planned.1 {
            return Ok(());
        }
        let lanes = self.lanes.len().min(SYMMETRY_GROUPS).min(b);
        let floats = Activations::floats(&self.model.config, micro, t).and_then(|f| f.checked_mul(lanes));
        let what = format!("the activations of {lanes} lane(s) for micro-batches of [{micro}, {t}]");
        crate::memory::ensure(crate::memory::f32_bytes(floats), &what).map_err(|e| e.to_string())?;
        *planned = (micro.max(planned.0), t.max(planned.1));
        Ok(())
    }

    /// One optimizer step on a [B, T+1] batch (inputs are each row's first T
    /// ids, targets its last T) at learning rate `lr`. A non-finite loss or
    /// gradient is refused before the parameters change.
    pub fn step(&mut self, batch: &[u32], b: usize, t: usize, lr: f32) -> Result<StepReport, StepError> {
        self.check(batch, b, t).map_err(StepError::BadBatch)?;
        let t0 = Instant::now();
        let SphereRun { mbs, lane_plan, reports: spheres } = self.run_spheres(batch, b, t, true).map_err(StepError::SphereFailed)?;
        let compute_s = t0.elapsed().as_secs_f64();
        let loss = spheres.iter().map(|r| r.loss_sum).sum::<f64>() / (b * t) as f64;
        let mut group_sequences = [0usize; SYMMETRY_GROUPS];
        for mb in &mbs {
            group_sequences[mb.group] = mb.sequences.len();
        }
        // Node Zero: reduce the lanes' gradients in lane order.
        let mut guards: Vec<_> = self.lanes.iter().map(|l| lock(&l.mem)).collect();
        let used: Vec<usize> = (0..self.lanes.len()).filter(|&l| !lane_plan[l].is_empty()).collect();
        let (first, others) = used.split_first().expect("a batch has work");
        let mut total = std::mem::take(&mut guards[*first].grads);
        let rest: Vec<&[f32]> = others.iter().map(|&l| &guards[l].grads[..]).collect();
        let grad_norm = self.pool.install(|| {
            total.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
                for g in &rest {
                    for (a, b) in chunk.iter_mut().zip(&g[ci * CHUNK..]) {
                        *a += b;
                    }
                }
            });
            let partial: Vec<f64> = total.par_chunks(CHUNK).map(global_norm).map(|n| n * n).collect();
            partial.iter().sum::<f64>().sqrt()
        });
        drop(rest);
        let result = if !loss.is_finite() || !grad_norm.is_finite() {
            Err(StepError::NonFinite { loss, grad_norm })
        } else {
            let clip = self.hyper.grad_clip as f64;
            if clip > 0.0 && grad_norm > clip {
                let scale = (clip / grad_norm) as f32;
                self.pool.install(|| total.par_iter_mut().for_each(|g| *g *= scale));
            }
            let hp = AdamW { lr, ..self.hyper.adamw };
            let (opt, model) = (&mut self.opt, &mut self.model);
            self.pool.install(|| opt.update(&model.layout, &mut model.params, &total, &hp));
            self.dealt += b as u64;
            Ok(())
        };
        guards[*first].grads = total;
        result?;
        Ok(StepReport { loss, grad_norm, group_sequences, spheres, compute_s, step_s: t0.elapsed().as_secs_f64() })
    }

    /// Mean loss of a [B, T+1] batch, forward only, on the spheres.
    pub fn eval(&self, batch: &[u32], b: usize, t: usize) -> Result<f64, String> {
        self.check(batch, b, t)?;
        let reports = self.run_spheres(batch, b, t, false)?.reports;
        Ok(reports.iter().map(|r| r.loss_sum).sum::<f64>() / (b * t) as f64)
    }
}

/// CPU affinity of sphere threads (Linux; elsewhere a no-op).
mod affinity {
    /// The CPUs this process may run on.
    #[cfg(target_os = "linux")]
    pub fn allowed_cpus() -> Vec<usize> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Vec::new();
            }
            (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
        }
    }

    /// Run the calling thread on `cpu` only (best effort).
    #[cfg(target_os = "linux")]
    pub fn pin_current_thread(cpu: usize) {
        // SAFETY: as above; pid 0 means the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn allowed_cpus() -> Vec<usize> {
        Vec::new()
    }

    #[cfg(not(target_os = "linux"))]
    pub fn pin_current_thread(_cpu: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deal_gives_every_group_an_equal_share_over_an_epoch_even_when_skewed() {
        // every sequence starts with a token of group 0
        let mut counts = [0usize; SYMMETRY_GROUPS];
        let mut dealt = 0;
        for _ in 0..25 {
            let firsts = vec![24u32; 10];
            for mb in deal(&firsts, dealt) {
                counts[mb.group] += mb.sequences.len();
            }
            dealt += 10;
        }
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 250);
    }

    #[test]
    fn deal_prefers_each_sequence_s_own_group_and_covers_every_sequence() {
        let firsts: Vec<u32> = (0..12).map(|g| (11 - g) as u32 + 12).collect();
        let mbs = deal(&firsts, 0);
        assert_eq!(mbs.len(), 12);
        for mb in &mbs {
            assert_eq!(mb.sequences.len(), 1);
            assert_eq!(firsts[mb.sequences[0]] as usize % 12, mb.group);
        }
    }

    #[test]
    fn route_balances_lanes_and_spheres_and_keeps_node_zero_free() {
        let mbs = deal(&vec![5u32; 16], 0); // 4 groups of 2, 8 of 1
        for (threads, lanes) in [(2, 1), (3, 2), (5, 4), (12, 2), (12, 11), (20, 2)] {
            let plan = route(&mbs, threads, lanes);
            assert!(plan[0].is_empty());
            let load = |s: usize| plan[s].iter().map(|&i| mbs[i].sequences.len()).sum::<usize>();
            let mut lane_loads = vec![0; lanes];
            for s in 1..threads {
                lane_loads[lane_of(s, threads, lanes).unwrap()] += load(s);
            }
            assert_eq!(lane_loads.iter().sum::<usize>(), 16);
            assert!(lane_loads.iter().max().unwrap() - lane_loads.iter().min().unwrap() <= 1, "{lane_loads:?}");
            let loads: Vec<usize> = (1..threads).map(load).collect();
            // no sphere holds two micro-batches' worth more than another
            assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 2, "{threads}: {loads:?}");
        }
        assert_eq!(route(&mbs, 1, 1)[0].len(), mbs.len());
        assert_eq!(lane_of(0, 12, 2), None);
        assert_eq!((lane_of(1, 12, 2), lane_of(2, 12, 2), lane_of(3, 12, 2)), (Some(0), Some(1), Some(0)));
    }

    fn tiny_cfg() -> Config {
        Config { vocab_size: 50, n_embd: 16, n_layer: 2, n_head: 2, block_size: 8 }
    }

    fn tiny_trainer(threads: usize, lanes: usize) -> Trainer {
        let cfg = tiny_cfg();
        let hyper = Hyper { adamw: AdamW { lr: 1e-2, ..Default::default() }, grad_clip: 1.0 };
        Trainer::with_lanes(Gpt2::new(cfg, 1).unwrap(), hyper, threads, lanes).unwrap()
    }

    fn batch(step: u32) -> Vec<u32> {
        (0..14 * 9).map(|i| (i * 7 + step * 3) % 50).collect()
    }

    #[test]
    fn same_threads_give_bit_identical_curves_and_threads_change_only_rounding() {
        let curves: Vec<Vec<f64>> = [(4usize, 2usize), (4, 2), (1, 1), (12, 11), (12, 2)]
            .iter()
            .map(|&(th, lanes)| {
                let mut tr = tiny_trainer(th, lanes);
                (0..5).map(|s| tr.step(&batch(s), 14, 8, 1e-2).unwrap().loss).collect()
            })
            .collect();
        assert_eq!(curves[0], curves[1]);
        for other in &curves[2..] {
            for (a, b) in curves[0].iter().zip(other) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
        assert!(curves[0][4] < curves[0][0]);
    }

    #[test]
    fn every_worker_sphere_gets_work_with_twelve_threads() {
        let mut tr = tiny_trainer(12, 2);
        let r = tr.step(&batch(0), 14, 8, 1e-2).unwrap();
        assert_eq!(r.spheres[0].micro_batches, 0);
        assert!(r.spheres[1..].iter().all(|s| s.micro_batches >= 1));
        assert_eq!(r.group_sequences.iter().sum::<usize>(), 14);
    }

    #[test]
    fn a_panicking_sphere_ends_the_step_with_an_error_instead_of_a_hang() {
        // sphere 1 shares its lane with later spheres, which must not wait forever
        let mut tr = tiny_trainer(12, 2);
        tr.panic_sphere = Some(1);
        let before = tr.model.params.clone();
        let err = tr.step(&batch(0), 14, 8, 1e-2).unwrap_err();
        assert!(matches!(&err, StepError::SphereFailed(m) if m.contains("sphere 1 failed")), "{err}");
        assert!(tr.eval(&batch(0), 14, 8).unwrap_err().contains("sphere 1 failed"));
        assert_eq!(tr.opt.step, 0);
        assert!(before.iter().zip(&tr.model.params).all(|(a, b)| a.to_bits() == b.to_bits()));
        // the trainer still works once the fault is gone
        tr.panic_sphere = None;
        assert!(tr.step(&batch(0), 14, 8, 1e-2).is_ok());
    }

    #[test]
    fn a_batch_too_large_for_memory_is_refused_before_it_allocates() {
        // activations alone: 2048 blocks x about 16 C = 256 floats per token x 2^20 tokens = 2 TiB
        let cfg = Config { vocab_size: 50, n_embd: 16, n_layer: 2048, n_head: 2, block_size: 1 << 20 };
        let hyper = Hyper { adamw: AdamW::default(), grad_clip: 1.0 };
        let tr = Trainer::with_lanes(Gpt2::new(cfg, 1).unwrap(), hyper, 2, 1).unwrap();
        let t = 1 << 20;
        let batch = vec![1u32; t + 1];
        let err = tr.eval(&batch, 1, t).unwrap_err();
        assert!(err.contains("needs") && err.contains("of memory is available"), "{err}");
        assert!(Trainer::with_lanes(Gpt2::new(tiny_cfg(), 1).unwrap(), hyper, MAX_THREADS + 1, 1).is_err());
    }

    #[test]
    fn a_non_finite_loss_leaves_the_parameters_unchanged() {
        let mut tr = tiny_trainer(3, 2);
        tr.model.params[100] = f32::NAN;
        let before = tr.model.params.clone();
        let err = tr.step(&batch(0), 14, 8, 1e-2).unwrap_err();
        assert!(matches!(err, StepError::NonFinite { .. }), "{err}");
        assert_eq!(tr.opt.step, 0);
        assert!(before.iter().zip(&tr.model.params).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
