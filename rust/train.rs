//! The kissing-sphere trainer: one optimizer step of a GPT-2 model on a rayon
//! pool of N threads laid out as spheres.
//!
//! Sphere 0 is Node Zero, the control thread: it deals each step's sequences
//! into the 12 symmetry groups, routes the groups' micro-batches to the worker
//! spheres 1..N-1, reduces their gradients in a fixed order and applies AdamW.
//! Each worker sphere runs forward and backward passes of its micro-batches,
//! writing gradients only into memory it owns: the lane (a gradient buffer,
//! activations and a team of cores, planned by `crate::plan`) it holds while
//! it computes. A one-core team's sphere computes on its own thread; a
//! larger team's sphere runs its kernels on the team's rayon pool, pinned to
//! the team's cores. With one thread, Node Zero does everything.
//!
//! Determinism: the deal, the plan and routing, the lanes' turn order and the
//! reduction order depend only on the batch, the thread count and the core
//! count, and a team's kernels give the bits of one core whatever its size,
//! so the same inputs give bit-identical results. Another thread or core
//! count sums the same gradients in another grouping, which changes results
//! only by float rounding.

use crate::kernels::adamw::AdamW;
use crate::kernels::bf16::Precision;
use crate::model::{Activations, Config, Gpt2, Panels};
use crate::optim::{global_norm, Optimizer};
use crate::plan::{self, workers, Teams};
use rayon::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Every token id belongs to symmetry group `id % SYMMETRY_GROUPS`.
pub const SYMMETRY_GROUPS: usize = 12;

/// The most threads a pool may have: far more than any machine's cores,
/// few enough that their stacks fit in memory.
pub const MAX_THREADS: usize = 1024;

/// Elements per parallel chunk in the reduction, clipping and norm.
const CHUNK: usize = 1 << 15;

/// Crews (team pools of a batch shape's plan) a trainer keeps: training and
/// a shorter last validation batch use two.
const CREWS: usize = 4;

/// The sequences of one symmetry group in one step, or the piece of them
/// one sphere runs when the plan splits the group.
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

/// A process's share of a step's batch when several processes (MPI ranks)
/// train together: it holds sequences `offset..offset + b` of a global batch
/// of `total`. Its gradient is d(mean loss over all `total`)/dparams, so the
/// processes' gradients sum to the global one; its slots in the symmetry
/// groups' rotation start at `offset`, so over the cluster every group gets
/// an equal share as it would in one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub total: usize,
    pub offset: usize,
}

impl Share {
    /// The whole batch of `b` sequences in one process.
    pub fn whole(b: usize) -> Self {
        Share { total: b, offset: 0 }
    }
}

/// What the forward and backward passes of a step did, before the update.
#[derive(Clone, Debug)]
pub struct GradReport {
    /// Summed token losses of this process's sequences.
    pub loss_sum: f64,
    pub group_sequences: [usize; SYMMETRY_GROUPS],
    pub spheres: Vec<SphereReport>,
    pub compute_s: f64,
}

/// The working memory of one team of cores: a gradient buffer and
/// activations.
///
/// A trainer has as many lanes as cores, at most one per worker sphere; a
/// step's plan uses some of them. Each worker sphere is given a lane and,
/// when it is its turn, owns the lane's memory while it runs its
/// micro-batches. With a team per sphere this is simply each sphere's own
/// memory; with 12 spheres on 2 cores the spheres of a lane take turns in a
/// fixed order instead of time-slicing the cores, so memory and gradient
/// traffic scale with the lanes, not the spheres or the cores, and the sums
/// stay deterministic.
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

/// Refuse a core count the teams cannot have (more than the CPUs this
/// process may use is allowed: the teams share them, with the results of
/// that many cores).
pub fn check_cores(cores: usize) -> Result<(), String> {
    if !(1..=MAX_THREADS).contains(&cores) {
        return Err(format!("cores must be between 1 and {MAX_THREADS}, got {cores}"));
    }
    Ok(())
}

/// Cores this process may run on.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Lanes of working memory a trainer of `threads` threads keeps on `cores`
/// cores: one per core, at most one per worker sphere (a step's plan uses
/// at most as many as it has sequences).
pub fn lanes_for(threads: usize, cores: usize) -> usize {
    cores.clamp(1, workers(threads))
}

/// Bytes a trainer allocates to train `config` on batches of `batch`
/// sequences of `seq_len` tokens: the weights and two AdamW moments once,
/// then for each lane of the plan (`plan::teams`: at most the cores, the
/// worker spheres and the sequences) a gradient buffer and the activations
/// of the largest symmetry group's micro-batch, whatever the team's size;
/// in bf16 also the weights rounded to bf16 (`Panels::training_bytes`).
/// None when it overflows.
pub fn training_bytes(config: &Config, batch: usize, seq_len: usize, threads: usize, cores: usize, precision: Precision) -> Option<u64> {
    let params = config.checked_num_parameters()?;
    let lanes = plan::teams(cores, threads, batch, seq_len).lanes();
    let micro = batch.div_ceil(SYMMETRY_GROUPS);
    let per_lane = params.checked_add(Activations::floats(config, micro, seq_len)?)?;
    let floats = params.checked_mul(3)?.checked_add(lanes.checked_mul(per_lane)?)?;
    let bf16 = match precision {
        Precision::Fp32 => 0,
        Precision::Bf16 => Panels::training_bytes(config)?,
    };
    (floats as u64).checked_mul(std::mem::size_of::<f32>() as u64)?.checked_add(bf16)
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
    /// Cores the plans divide among the spheres.
    cores: usize,
    /// The CPUs this process may use, in order; teams are pinned to the
    /// first `cores` of them when there are that many.
    cpus: Vec<usize>,
    pool: rayon::ThreadPool,
    lanes: Vec<Lane>,
    /// The summed gradient of the last `gradients` call, [P]. One
    /// allocation for the trainer's life (lent to lane 0 while the spheres
    /// run), so a view of it stays valid.
    grad: Vec<f32>,
    /// Sequences of the global batch whose gradient waits for `apply`.
    pending: Option<usize>,
    /// The latest batch shapes' plans with their team pools, oldest first.
    crews: Mutex<Vec<(Shape, Arc<Crew>)>>,
    /// The plan the sphere threads are pinned for.
    pinned: Mutex<Option<Teams>>,
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

/// A batch's (B, T).
type Shape = (usize, usize);

/// The threads of one batch shape's plan: a rayon pool for each team of
/// more than one core, pinned to the team's CPUs (None for one-core teams,
/// whose spheres compute on their own threads).
struct Crew {
    teams: Teams,
    pools: Vec<Option<rayon::ThreadPool>>,
}

impl Trainer {
    /// A trainer whose spheres use every core this process may use.
    pub fn new(model: Gpt2, hyper: Hyper, threads: usize) -> Result<Self, String> {
        Self::with_cores(model, hyper, threads, available_cores())
    }

    /// A trainer whose spheres divide `cores` cores among them.
    pub fn with_cores(model: Gpt2, hyper: Hyper, threads: usize, cores: usize) -> Result<Self, String> {
        check_threads(threads)?;
        check_cores(cores)?;
        hyper.validate()?;
        let lanes = lanes_for(threads, cores);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| if i == 0 { "node-zero".into() } else { format!("sphere-{i}") })
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
        let grad = vec![0.0; model.layout.total];
        Ok(Trainer {
            model,
            opt,
            hyper,
            dealt: 0,
            threads,
            cores,
            cpus: affinity::allowed_cpus(),
            pool,
            lanes,
            grad,
            pending: None,
            crews: Mutex::new(Vec::new()),
            pinned: Mutex::new(None),
            running: Mutex::new(()),
            planned: Mutex::new((0, 0)),
            #[cfg(test)]
            panic_sphere: None,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn cores(&self) -> usize {
        self.cores
    }

    /// Whether teams and lanes are pinned to CPUs: only when this process
    /// may use as many as the plans divide.
    fn pins(&self) -> bool {
        self.cores <= self.cpus.len()
    }

    /// The plan of a [b, t] batch with its team pools, made on first use.
    fn crew(&self, b: usize, t: usize) -> Result<Arc<Crew>, String> {
        let mut crews = lock(&self.crews);
        if let Some(i) = crews.iter().position(|(shape, _)| *shape == (b, t)) {
            let hit = crews.remove(i);
            crews.push(hit);
            return Ok(crews[crews.len() - 1].1.clone());
        }
        let teams = plan::teams(self.cores, self.threads, b, t);
        let mut pools = Vec::with_capacity(teams.lanes());
        for (l, (&k, first)) in teams.cores.iter().zip(teams.first_cores()).enumerate() {
            if k <= 1 {
                pools.push(None);
                continue;
            }
            let cpus = if self.pins() { self.cpus[first..first + k].to_vec() } else { Vec::new() };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(k)
                .thread_name(move |i| format!("team-{l}-{i}"))
                .start_handler(move |_| affinity::pin_current_thread(&cpus))
                .build()
                .map_err(|e| format!("cannot start a team of {k} threads: {e}"))?;
            pools.push(Some(pool));
        }
        crews.push(((b, t), Arc::new(Crew { teams, pools })));
        if crews.len() > CREWS {
            crews.remove(0);
        }
        Ok(crews[crews.len() - 1].1.clone())
    }

    /// Pin the sphere threads for `teams`: when spheres share one-core
    /// lanes, each lane's spheres to its core, so a sphere woken for its
    /// turn starts at once where its predecessor just finished; every
    /// other sphere thread (waiting on its team, or alone on its lane) may
    /// run on any CPU.
    fn pin_spheres(&self, teams: &Teams) {
        let mut pinned = lock(&self.pinned);
        if !self.pins() || pinned.as_ref() == Some(teams) {
            return;
        }
        let shared = teams.lanes() < workers(self.threads);
        let firsts = teams.first_cores();
        self.pool.broadcast(|ctx| match lane_of(ctx.index(), self.threads, teams.lanes()) {
            Some(l) if shared && teams.cores[l] == 1 => affinity::pin_current_thread(&self.cpus[firsts[l]..=firsts[l]]),
            _ => affinity::pin_current_thread(&self.cpus),
        });
        *pinned = Some(teams.clone());
    }

    /// Run every micro-batch of a [B, T+1] batch, this process's `share`
    /// of the step's, on the spheres. With `backward`, the gradient buffer
    /// of each lane listed in the returned lane plan holds the sum over its
    /// spheres' micro-batches of d(mean loss of the global batch)/dparams.
    fn run_spheres(&self, batch: &[u32], b: usize, t: usize, share: Share, backward: bool) -> Result<SphereRun, String> {
        let firsts: Vec<u32> = (0..b).map(|i| batch[i * (t + 1)]).collect();
        let mbs = deal(&firsts, self.dealt + share.offset as u64);
        let crew = self.crew(b, t)?;
        let lanes = crew.teams.lanes();
        let plan = plan::route(&mbs, &crew.teams, self.threads);
        // Each lane's spheres with work, in the order they take their turns.
        let mut lane_plan = vec![Vec::new(); self.lanes.len()];
        for s in (0..self.threads).filter(|&s| !plan[s].is_empty()) {
            lane_plan[lane_of(s, self.threads, lanes).expect("work goes to spheres with lanes")].push(s);
        }
        let mut slot = vec![None; self.threads];
        for (l, spheres) in lane_plan.iter().enumerate() {
            for (k, &s) in spheres.iter().enumerate() {
                slot[s] = Some((l, k));
            }
        }
        let dloss = 1.0 / (share.total * t) as f32;
        let model = &self.model;
        let _running = lock(&self.running);
        self.pin_spheres(&crew.teams);
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
                for mb in &plan[me] {
                    let seqs = &mb.sequences;
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
                    report.loss_sum += match &crew.pools[l] {
                        Some(team) => team.install(|| model.loss_sum(acts, &x, &y, g, dloss, crew.teams.cores[l])),
                        None => model.loss_sum(acts, &x, &y, g, dloss, 1),
                    };
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
        let lanes = plan::teams(self.cores, self.threads, b, t).lanes();
        let floats = Activations::floats(&self.model.config, micro, t).and_then(|f| f.checked_mul(lanes));
        let what = format!("the activations of {lanes} lane(s) for micro-batches of [{micro}, {t}]");
        crate::memory::ensure(crate::memory::f32_bytes(floats), &what).map_err(|e| e.to_string())?;
        *planned = (micro.max(planned.0), t.max(planned.1));
        Ok(())
    }

    /// One optimizer step on a [B, T+1] batch (inputs are each row's first T
    /// ids, targets its last T) at learning rate `lr`: `gradients` of the
    /// whole batch, then `apply`. A non-finite loss or gradient is refused
    /// before the parameters change.
    pub fn step(&mut self, batch: &[u32], b: usize, t: usize, lr: f32) -> Result<StepReport, StepError> {
        let t0 = Instant::now();
        let GradReport { loss_sum, group_sequences, spheres, compute_s } = self.gradients(batch, b, t, Share::whole(b))?;
        let loss = loss_sum / (b * t) as f64;
        let grad_norm = self.apply(lr, loss)?;
        Ok(StepReport { loss, grad_norm, group_sequences, spheres, compute_s, step_s: t0.elapsed().as_secs_f64() })
    }

    /// Forward and backward passes of this process's `share` of a step: a
    /// [B, T+1] batch holding rows `share.offset..share.offset + B` of the
    /// global batch. Leaves the sum of the lanes' gradients in `gradient()`
    /// for `apply` (after other processes' gradients are added to it).
    pub fn gradients(&mut self, batch: &[u32], b: usize, t: usize, share: Share) -> Result<GradReport, StepError> {
        self.check(batch, b, t).map_err(StepError::BadBatch)?;
        if share.offset.checked_add(b).is_none_or(|end| end > share.total) {
            let msg = format!("rows {}..{} are not inside a global batch of {}", share.offset, share.offset + b, share.total);
            return Err(StepError::BadBatch(msg));
        }
        self.pending = None;
        let t0 = Instant::now();
        // Lane 0 sums into the trainer's own buffer (it runs the first
        // micro-batch unless teams of unequal sizes say otherwise).
        lock(&self.lanes[0].mem).grads = std::mem::take(&mut self.grad);
        let run = self.run_spheres(batch, b, t, share, true);
        self.grad = std::mem::take(&mut lock(&self.lanes[0].mem).grads);
        let SphereRun { mbs, lane_plan, reports: spheres } = run.map_err(StepError::SphereFailed)?;
        let compute_s = t0.elapsed().as_secs_f64();
        let loss_sum = spheres.iter().map(|r| r.loss_sum).sum::<f64>();
        let mut group_sequences = [0usize; SYMMETRY_GROUPS];
        for mb in &mbs {
            group_sequences[mb.group] = mb.sequences.len();
        }
        // Node Zero: reduce the lanes' gradients in lane order.
        let guards: Vec<_> = self.lanes.iter().map(|l| lock(&l.mem)).collect();
        let used: Vec<usize> = (0..self.lanes.len()).filter(|&l| !lane_plan[l].is_empty()).collect();
        let (first, others) = used.split_first().expect("a batch has work");
        if *first != 0 {
            self.grad.copy_from_slice(&guards[*first].grads);
        }
        let rest: Vec<&[f32]> = others.iter().map(|&l| &guards[l].grads[..]).collect();
        let total = &mut self.grad;
        self.pool.install(|| {
            total.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
                for g in &rest {
                    for (a, b) in chunk.iter_mut().zip(&g[ci * CHUNK..]) {
                        *a += b;
                    }
                }
            });
        });
        self.pending = Some(share.total);
        Ok(GradReport { loss_sum, group_sequences, spheres, compute_s })
    }

    /// The summed gradient [P] the last `gradients` call left, which other
    /// processes' gradients may be added to before `apply`.
    pub fn gradient(&self) -> &[f32] {
        &self.grad
    }

    pub fn gradient_mut(&mut self) -> &mut [f32] {
        &mut self.grad
    }

    /// Clip `gradient()` to the global norm and apply AdamW at learning
    /// rate `lr`; `loss` is the step's mean loss over the global batch.
    /// Returns the norm before clipping. A non-finite loss or gradient is
    /// refused before the parameters change; either way the gradient is used up.
    pub fn apply(&mut self, lr: f32, loss: f64) -> Result<f64, StepError> {
        let Some(total) = self.pending.take() else {
            return Err(StepError::BadBatch("apply needs the gradients of a step first".into()));
        };
        let grad = &mut self.grad;
        let grad_norm = self.pool.install(|| {
            let partial: Vec<f64> = grad.par_chunks(CHUNK).map(global_norm).map(|n| n * n).collect();
            partial.iter().sum::<f64>().sqrt()
        });
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(StepError::NonFinite { loss, grad_norm });
        }
        let clip = self.hyper.grad_clip as f64;
        if clip > 0.0 && grad_norm > clip {
            let scale = (clip / grad_norm) as f32;
            self.pool.install(|| grad.par_iter_mut().for_each(|g| *g *= scale));
        }
        let hp = AdamW { lr, ..self.hyper.adamw };
        let (opt, model) = (&mut self.opt, &mut self.model);
        self.pool.install(|| {
            opt.update(&model.layout, &mut model.params, grad, &hp);
            // bf16: the matmuls read the weights rounded once per step
            model.cast_weights();
        });
        self.dealt += total as u64;
        Ok(grad_norm)
    }

    /// Mean loss of a [B, T+1] batch, forward only, on the spheres.
    pub fn eval(&self, batch: &[u32], b: usize, t: usize) -> Result<f64, String> {
        self.check(batch, b, t)?;
        let reports = self.run_spheres(batch, b, t, Share::whole(b), false)?.reports;
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

    /// Run the calling thread on these CPUs only (best effort; none: no
    /// change).
    #[cfg(target_os = "linux")]
    pub fn pin_current_thread(cpus: &[usize]) {
        if cpus.is_empty() {
            return;
        }
        // SAFETY: as above; pid 0 means the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn allowed_cpus() -> Vec<usize> {
        Vec::new()
    }

    #[cfg(not(target_os = "linux"))]
    pub fn pin_current_thread(_cpus: &[usize]) {}
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

    fn tiny_cfg() -> Config {
        Config { vocab_size: 50, n_embd: 16, n_layer: 2, n_head: 2, block_size: 8 }
    }

    fn tiny_trainer(threads: usize, cores: usize) -> Trainer {
        let cfg = tiny_cfg();
        let hyper = Hyper { adamw: AdamW { lr: 1e-2, ..Default::default() }, grad_clip: 1.0 };
        Trainer::with_cores(Gpt2::new(cfg, 1).unwrap(), hyper, threads, cores).unwrap()
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

    /// Five steps' losses and the final parameters of a tiny trainer.
    fn train_five(threads: usize, cores: usize) -> (Vec<f64>, Vec<f32>) {
        let mut tr = tiny_trainer(threads, cores);
        let losses = (0..5).map(|s| tr.step(&batch(s), 14, 8, 1e-2).unwrap().loss).collect();
        (losses, tr.model.params)
    }

    #[test]
    fn a_team_of_cores_gives_the_bits_of_one_core() {
        // one worker sphere (or Node Zero alone): its lane's team is every
        // core. Wide enough that the GEMMs split over the team's threads.
        let cfg = Config { vocab_size: 300, n_embd: 64, n_layer: 2, n_head: 4, block_size: 64 };
        let hyper = Hyper { adamw: AdamW { lr: 1e-2, ..Default::default() }, grad_clip: 1.0 };
        let batch = |step: u32| -> Vec<u32> { (0..4 * 65).map(|i| (i * 7 + step * 13) % 300).collect() };
        let run = |threads: usize, cores: usize| {
            let mut tr = Trainer::with_cores(Gpt2::new(cfg, 1).unwrap(), hyper, threads, cores).unwrap();
            let losses: Vec<f64> = (0..3).map(|s| tr.step(&batch(s), 4, 64, 1e-2).unwrap().loss).collect();
            assert_eq!(tr.crew(4, 64).unwrap().pools[0].is_some(), cores > 1);
            (losses, tr.model.params)
        };
        for threads in [1, 2] {
            assert_eq!(plan::teams(5, threads, 4, 64).cores, vec![5]);
            let (one, p1) = run(threads, 1);
            for cores in [3, 5] {
                let (team, p) = run(threads, cores);
                assert_eq!(one, team, "{threads} threads on {cores} cores");
                assert!(p1.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn core_counts_change_the_curve_only_by_rounding_and_each_is_reproducible() {
        // 16 and 40 cores make teams (more cores than the 11 workers): the
        // same count twice gives the same bits, another count only rounding
        let curves: Vec<Vec<f64>> = [1, 2, 16, 16, 40].iter().map(|&cores| train_five(12, cores).0).collect();
        assert!(plan::teams(16, 12, 14, 8).cores.iter().any(|&k| k > 1));
        assert_eq!(curves[2], curves[3]);
        for other in &curves[1..] {
            for (a, b) in curves[0].iter().zip(other) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
        let refused = Trainer::with_cores(Gpt2::new(tiny_cfg(), 1).unwrap(), tiny_trainer(2, 1).hyper, 12, 0);
        assert!(refused.is_err_and(|e| e.contains("cores must be between 1 and")));
    }

    #[test]
    fn two_shares_summed_give_the_whole_batch_s_step_to_rounding() {
        // what K = 2 processes do: each its half of the batch, gradients summed, then apply
        let (mut whole, mut a, mut b) = (tiny_trainer(4, 2), tiny_trainer(4, 2), tiny_trainer(3, 1));
        for s in 0..4 {
            let full = batch(s);
            let r = whole.step(&full, 14, 8, 1e-2).unwrap();
            let (top, bottom) = full.split_at(5 * 9);
            let ga = a.gradients(top, 5, 8, Share { total: 14, offset: 0 }).unwrap();
            let gb = b.gradients(bottom, 9, 8, Share { total: 14, offset: 5 }).unwrap();
            let groups: Vec<usize> = (0..SYMMETRY_GROUPS).map(|g| ga.group_sequences[g] + gb.group_sequences[g]).collect();
            assert_eq!(groups, r.group_sequences.to_vec(), "the cluster deals as one process does");
            let sum: Vec<f32> = a.gradient().iter().zip(b.gradient()).map(|(x, y)| x + y).collect();
            a.gradient_mut().copy_from_slice(&sum);
            b.gradient_mut().copy_from_slice(&sum);
            let loss = (ga.loss_sum + gb.loss_sum) / (14 * 8) as f64;
            assert!((loss - r.loss).abs() < 1e-6 * r.loss, "{loss} vs {}", r.loss);
            let (na, nb) = (a.apply(1e-2, loss).unwrap(), b.apply(1e-2, loss).unwrap());
            assert!(na == nb && (na - r.grad_norm).abs() < 1e-5 * r.grad_norm, "{na} {nb} {}", r.grad_norm);
        }
        assert!(a.model.params.iter().zip(&b.model.params).all(|(x, y)| x.to_bits() == y.to_bits()));
        // to rounding: AdamW (lr 1e-2) turns gradients that differ in the last bits into
        // steps that differ by up to about 1e-5; 5e-5 is 0.1% of what 4 steps can move a weight
        assert!(a.model.params.iter().zip(&whole.model.params).all(|(x, y)| (x - y).abs() < 5e-5));
        assert_eq!((a.dealt, a.opt.step), (whole.dealt, whole.opt.step));
    }

    #[test]
    fn apply_needs_gradients_and_a_share_must_lie_inside_the_batch() {
        let mut tr = tiny_trainer(2, 1);
        assert!(matches!(tr.apply(1e-2, 1.0), Err(StepError::BadBatch(_))));
        let err = tr.gradients(&batch(0), 14, 8, Share { total: 14, offset: 1 }).unwrap_err();
        assert!(matches!(&err, StepError::BadBatch(m) if m.contains("1..15")), "{err}");
        tr.gradients(&batch(0), 14, 8, Share::whole(14)).unwrap();
        tr.apply(1e-2, 1.0).unwrap();
        assert!(tr.apply(1e-2, 1.0).is_err(), "a gradient is applied once");
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
        let tr = Trainer::with_cores(Gpt2::new(cfg, 1).unwrap(), hyper, 2, 1).unwrap();
        let t = 1 << 20;
        let batch = vec![1u32; t + 1];
        let err = tr.eval(&batch, 1, t).unwrap_err();
        assert!(err.contains("needs") && err.contains("of memory is available"), "{err}");
        assert!(Trainer::with_cores(Gpt2::new(tiny_cfg(), 1).unwrap(), hyper, MAX_THREADS + 1, 1).is_err());
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
