/*
 * PercpuRef, rseq variant (per-CPU counters; include/pgmap/core/detail/rseq_percpu.h,
 * src/core/rseq.{h,cc}, src/core/percpu_ref.cc):
 *
 *   each get/put is one restartable critical section:
 *     cpu = rseq->cpu_id; word = *ref_word; if (word & flags) leave (slow path);
 *     counter[cpu] += delta   (the commit: a single non-locked add)
 *   kill: word |= ATOMIC|DEAD; membarrier(PRIVATE_EXPEDITED_RSEQ); fold every CPU's counter into
 *   the shared count (bias still in); if the initial reference is there, bias out, confirm, drop
 *   the initial reference; else undo the kill.
 *
 * Restartable sections. A section that is preempted, migrated, or interrupted by the rseq
 * membarrier does not resume: it restarts from the mode load (the abort is a transition of this
 * model). The model records each thread's in-flight section (insec: its CPU) and whether it has
 * been aborted (abrt): a thread entering a section on CPU c aborts the section in flight there
 * (it preempted it); its commit, one atomic step because the commit is one instruction at the
 * end of the section, happens only if its section was not aborted; otherwise it starts over
 * (possibly on the other CPU). The rseq membarrier aborts every in-flight section. The model is sequentially consistent: the barrier's ordering role is played by the
 * abort, which is what the real protocol relies on.
 *
 * As built (include/pgmap/core/detail/rseq_percpu.h rseq_percpu_add; src/core/percpu_ref.cc
 * tryget_slow, put_atomic/put_reached, fold_locked, kill_and_confirm): the kill publishes
 * ATOMIC|DEAD, issues Registry::barrier() (membarrier PRIVATE_EXPEDITED_RSEQ), collects the
 * counters and adds them to the shared count with the bias still in; only if that finds the
 * initial reference (>= 1) does the bias come out, confirm run and the initial reference drop.
 *
 * STRAY_PUT (a run that must pass): user 1 misuses the ref with a put without a get. If the
 * fold then finds fewer than 1, kill_and_confirm undoes the kill (mode back to percpu, bias kept,
 * Errc::underflow); checked: no release ran, the mode is percpu and the logical count (count -
 * bias + the CPU counters) equals gets - puts + 1 at the end. (When the fold still finds >= 1 the
 * misuse goes undetected by the kill and later puts may release early; not checked there.)
 *
 * Mutants (each must be refuted):
 *   MUT_PLAIN_BARRIER        membarrier(PRIVATE_EXPEDITED): a fence that aborts nothing, so a
 *                            section that read "percpu" before the flags can commit after the fold.
 *   MUT_FOLD_BEFORE_BARRIER  the fold reads the counters before the aborting barrier.
 *   MUT_UNBIAS_FIRST         (with STRAY_PUT) the fold takes the bias out before checking for the
 *                            initial reference: the undone (percpu again) ref has lost its bias.
 */

#define NU 2
#define NCPU 2
#define BIAS 50
#define M_ATOMIC 1
#define M_DEAD 2
#define M_MASK 3

byte mode = 0;               /* the ref word's flag bits (the counter address is fixed) */
short count = BIAS + 1;      /* kBias + the initial reference */
short pc[NCPU];              /* the ref's counter on each CPU */
byte insec[NU];              /* 1 + the CPU of the thread's in-flight section, 0 if none */
bit abrt[NU];                /* that section has been aborted (it will restart) */
/* Thread me runs on CPU me; up to MIGRATIONS sections in total run on the other CPU instead, so
 * two threads' sections interleave on one CPU (each entry preempts the section in flight there).
 * A bound, because real preemption is not an endless ping-pong; it keeps the liveness check
 * meaningful. */
#ifndef MIGRATIONS
#define MIGRATIONS 2
#endif
byte migrations = MIGRATIONS;

short held = 1;         /* ghost: the initial reference + gets - puts */
bit undone = 0;         /* the kill found more puts than gets and was undone */
bit confirmed = 0;
byte released = 0;
byte done = 0;

inline run_release() {
  atomic {
#ifndef STRAY_PUT
    assert(released == 0);
    assert(held == 0);
#else
    assert(!undone);                     /* an undone kill never releases */
#endif
    assert((mode & M_ATOMIC) != 0);
    released++
  }
}

inline put_atomic(now) {
  atomic { count--; now = count };
#ifndef STRAY_PUT
  assert(now >= 0);
#endif
  if
  :: now == 0 -> run_release()
  :: now < 0 -> count++                /* put_reached: undone, Errc::underflow */
  :: else -> skip
  fi
}

/* rseq_percpu_add(word, delta): ok = 1 if committed to a CPU counter, 0 if the word had flags.
 * kind: 1 tryget_live, 2 get, 3 put (ghost bookkeeping at the commit). */
inline rseq_add(delta, ok, kind) {
  do
  :: atomic {                            /* enter on this thread's CPU, or migrate (budget) */
      if
      :: cpu = me
      :: migrations > 0 -> migrations--; cpu = 1 - me
      fi;
      /* running here preempts the other thread's section on this CPU, if any */
      if
      :: insec[1 - me] == cpu + 1 -> abrt[1 - me] = 1
      :: else -> skip
      fi;
      insec[me] = cpu + 1; abrt[me] = 0
    };
    m = mode;                            /* word = *ref_word */
    if
    :: (m & M_MASK) != 0 -> insec[me] = 0; ok = 0; break   /* leave: slow path */
    :: else ->
      atomic {                           /* the commit, or the abort */
        if
        :: !abrt[me] ->
          pc[cpu] = pc[cpu] + delta;
          if
          :: kind == 1 -> held++; assert(!confirmed)   /* no get succeeds after confirm */
          :: kind == 2 -> held++
          :: kind == 3 -> held--
          fi;
          ok = 1
        :: else -> ok = 0                /* aborted: start over from the mode load */
        fi;
        insec[me] = 0
      };
      if
      :: ok -> break
      :: else -> skip
      fi
    fi
  od
}

inline tryget_live(ok) {
  t0 = confirmed;
  rseq_add(1, ok, 1);
  if
  :: ok -> skip
  :: else ->
    if
    :: (mode & M_DEAD) != 0 -> goto tl_fail
    :: else -> skip
    fi;
    old = count;
    do
    :: old <= 0 -> goto tl_fail
    :: else ->
      atomic {
        if
        :: count == old -> count = old + 1; break
        :: else -> old = count
        fi
      }
    od;
    atomic {
      if
      :: (mode & M_DEAD) != 0 -> dead = 1
      :: else -> dead = 0; held++; assert(!confirmed)
      fi
    };
    if
    :: dead -> put_atomic(now); goto tl_fail
    :: else -> skip
    fi;
    ok = 1;
    goto tl_done;
tl_fail:
    ok = 0;
tl_done:
    skip
  fi;
  assert(!(ok && t0))
}

inline get_ref() {
  rseq_add(1, ok, 2);
  if
  :: ok -> skip
  :: else ->
    atomic { old = count; count++; held++ };
#ifndef STRAY_PUT
    assert(old > 0)
#endif
  fi
}

inline put_ref() {
  rseq_add(-1, ok, 3);
  if
  :: ok -> skip
  :: else ->
    held--;
    put_atomic(now);
    if
    :: now < 0 -> held++                 /* the put did not happen */
    :: else -> skip
    fi
  fi
}

proctype user(byte me) {
  bit ok, t0, dead; byte m, cpu; short old, now;
#ifdef STRAY_PUT
  if
  :: me == 1 -> put_ref(); goto udone     /* misuse: a put without a get */
  :: else -> skip
  fi;
#endif
  tryget_live(ok);
  if
  :: ok ->
    if
    :: me == 0 ->
      get_ref();
#ifndef STRAY_PUT
      assert(released == 0);
#endif
      put_ref()
    :: else -> skip
    fi;
#ifndef STRAY_PUT
    assert(released == 0);
#endif
    put_ref()
  :: else -> skip
  fi;
udone:
  done++
}

/* rseq::barrier(): membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ) aborts every section. */
inline rseq_barrier() {
#ifndef MUT_PLAIN_BARRIER
  atomic { abrt[0] = (insec[0] != 0); abrt[1] = (insec[1] != 0) }
#else
  skip                                   /* a fence only: in-flight sections go on */
#endif
}

inline fold() {
  /* fold_locked: rseq::collect(slot): sum and zero every CPU's counter, one CPU at a time; then
   * one fetch_add of the sum with the bias still in (the count stays far from zero) */
  i = 0;
  do
  :: i < NCPU -> atomic { sum = sum + pc[i]; pc[i] = 0 }; i++
  :: else -> break
  od;
  atomic { count = count + sum; now = count - BIAS }
}

/* kill_and_confirm of a percpu ref: flags, rseq barrier, fold, then either drop the bias and
 * go on, or (more puts than gets: the initial reference is gone) undo the kill. */
proctype killer() {
  byte i; short sum, now;
  mode = M_ATOMIC | M_DEAD;              /* mode_.store(m | kAtomic | kDead, seq_cst) */
#ifndef MUT_FOLD_BEFORE_BARRIER
  rseq_barrier();                        /* Registry::barrier() */
  fold();
#else
  fold();
  rseq_barrier();
#endif
#ifdef MUT_UNBIAS_FIRST
  atomic { count = count - BIAS };       /* the spec's fold: the bias out before the check */
#endif
  if
#ifndef MUT_UNBIAS_FIRST
  :: now >= 1 -> atomic { count = count - BIAS }   /* the bias comes out */
#else
  :: now >= 1 -> skip
#endif
  :: else ->
#ifndef STRAY_PUT
    assert(0);                           /* without misuse the fold always finds the initial ref */
#endif
    /* undo: the mode word goes back to percpu; the count keeps its bias, the counters were
     * zeroed by the fold; no confirm, no initial put, Errc::underflow */
    atomic { mode = 0; undone = 1 };
    goto kdone
  fi;
  confirmed = 1;                         /* confirm() */
  atomic { held--; count--; now = count };   /* put_atomic(1): the initial reference */
  if
  :: now == 0 -> run_release()
  :: else -> skip
  fi;
kdone:
  done++
}

active proctype final_check() {
  (done == NU + 1);
#ifndef STRAY_PUT
  assert(released == 1 && held == 0 && count == 0 && pc[0] == 0 && pc[1] == 0)
#else
  /* an undone kill: no release ran, the ref is percpu again and its count is what the gets and
   * puts made it (the bias still in) */
  assert(!undone || (released == 0 && mode == 0 && count - BIAS + pc[0] + pc[1] == held))
#endif
}

init {
  atomic {
    run user(0);
    run user(1);
    run killer()
  }
}

/* Liveness (pan -a -f): every operation returns and kill completes. The restart loop is a cycle
 * of the model, so this is a real check: a section may abort and restart, but under weak fairness
 * not forever (the barrier aborts once, and preemptions are bounded by MIGRATIONS). */
ltl terminates { <> (done == NU + 1) }
