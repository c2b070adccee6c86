/*
 * PercpuRef's per-thread fallback as built (include/pgmap/core/percpu_ref.h: percpu_add's first
 * look at the word, then detail::thread_slot_add, reached through thread_add, out of line in
 * src/core/percpu_ref.cc when the rseq fast path is compiled in; src/core/percpu_ref.cc:
 * tryget_slow, put_atomic/put_reached, fold_locked, Registry::barrier/collect,
 * kill_and_confirm): per-thread counter blocks, an `active` in-flight flag per thread, the mode
 * word; kill = store ATOMIC|DEAD, heavy_barrier() (membarrier), collect: wait for every visible
 * `active` to clear and sum + zero the slots, add the sum to the count with the bias still in,
 * check that the initial reference is there (the undo when it is not: percpu_ref_rseq.pml,
 * STRAY_PUT, the same kill_and_confirm), take the bias out, confirm, drop the initial reference;
 * the atomic-mode put that reaches zero runs release. The thread's first use (thread_add_first:
 * ensure_thread_counters) is not modelled: each reader's block exists from the start.
 *
 * Memory model. The reader's fast path uses only relaxed stores and a compiler barrier; what
 * orders its `active = 1` store before its mode load is the killer's membarrier. So the readers
 * run on x86-TSO: every reader store goes through a FIFO store buffer (sb[]) that the `flusher`
 * drains one entry at a time, in any interleaving; the reader's own loads of its slot forward
 * from the buffer. A locked read-modify-write (the slow paths' fetch_add / CAS) first drains the
 * reader's own buffer. heavy_barrier() drains every reader's buffer, one reader at a time (each
 * CPU runs its barrier at its own moment inside the call). The killer is sequentially consistent
 * (its mode store is seq_cst, its count update locked). docs/model.md maps every step to the code.
 *
 * Configurations (spin -D...):
 *   SMALL                 user 0 does not take a second reference (used for the liveness run,
 *                         whose fair search visits every state about ten times).
 *   INIT_ATOMIC           the ref starts in atomic mode (PercpuRef::kInitAtomic): kill folds
 *                         nothing, tryget_live's DEAD checks are what refuses new gets.
 * Mutants (each must be refuted):
 *   MUT_FOLD_BEFORE_BARRIER  collect + fold, then the barrier.
 *   MUT_NO_BARRIER           no heavy_barrier() at all.
 *   MUT_CHECK_BEFORE_FLAG    percpu_add trusts its first look at the mode (before `active = 1`).
 *   MUT_NO_LIVE_CHECK        tryget_slow(live) checks DEAD neither before nor after its CAS.
 */

#define NU 2          /* user threads */
#define BIAS 50       /* kBias: larger than any count the model reaches */
#ifndef SB
#define SB 3          /* store-buffer entries per reader */
#endif
#define M_ATOMIC 1
#define M_DEAD 2
#define M_MASK 3

#ifdef INIT_ATOMIC
byte mode = M_ATOMIC;
short count = 1;             /* count_: the initial reference */
#else
byte mode = 0;               /* mode_: slot bits omitted (one ref), percpu */
short count = BIAS + 1;      /* count_: kBias + the initial reference */
#endif

/* Per reader: the memory values of its `active` flag and its slot of this ref. */
bit vis_active[NU];
short vis_slot[NU];
/* The reader's store buffer: (is_slot, value); the forwarding copy of its newest slot store. */
chan sb[NU] = [SB] of { bit, short };
short fwd_slot[NU];
byte npend_slot[NU];

/* Ghost state for the properties. */
byte held = 1;          /* references really held: the initial one + every successful get */
bit confirmed = 0;      /* the confirm callback has run */
byte released = 0;      /* how many times release ran */
byte done = 0;          /* processes finished */

inline apply(i, k, v) {
  if
  :: k -> vis_slot[i] = v; npend_slot[i]--
  :: else -> vis_active[i] = v
  fi
}

/* heavy_barrier() as seen from reader i's CPU: its store buffer drains completely. */
inline drain(i) {
  atomic {
    do
    :: nempty(sb[i]) -> sb[i]?k, v; apply(i, k, v)
    :: empty(sb[i]) -> break
    od
  }
}

inline heavy_barrier() {
  drain(0);
  drain(1)
}

/* put_reached(): only the put that moves the count to zero gets here. */
inline run_release() {
  atomic {
    assert(released == 0);       /* release runs once */
    assert(held == 0);           /* ... and only when nobody holds a reference */
    assert((mode & M_ATOMIC) != 0);
    released++
  }
}

/* put_slow / atomic-mode put_many: one fetch_sub; zero runs release. */
inline put_atomic(now) {
  empty(sb[me]);                 /* lock sub drains the own store buffer */
  atomic { count--; now = count };
  assert(now >= 0);              /* no underflow in correct use */
  if
  :: now == 0 -> run_release()
  :: else -> skip
  fi
}

/* PercpuRef::percpu_add(delta): ok = 1 if it counted in the slot. */
/* kind: 1 tryget_live, 2 get, 3 put (what the ghost state records at the commit). */
inline percpu_add(delta, ok, kind) {
  if
  :: (mode & M_MASK) != 0 -> ok = 0      /* the first look, without the flag */
  :: else ->
#ifndef MUT_CHECK_BEFORE_FLAG
    sb[me]!0, 1;                         /* t->active.store(1, relaxed) */
    m = mode;                            /* mode_.load(relaxed) after the compiler barrier */
#else
    sb[me]!0, 1;
    m = 0;                               /* mutant: decides on the first look only */
#endif
    if
    :: (m & M_MASK) == 0 ->
      /* c.store(c.load() + delta): the load forwards from the own store buffer */
      if
      :: npend_slot[me] > 0 -> tmp = fwd_slot[me]
      :: else -> tmp = vis_slot[me]
      fi;
      atomic {
        sb[me]!1, tmp + delta; fwd_slot[me] = tmp + delta; npend_slot[me]++;
        /* the get/put takes effect here */
        if
        :: kind == 1 -> held++; assert(!confirmed)   /* no get succeeds after confirm */
        :: kind == 2 -> held++
        :: kind == 3 -> held--
        fi
      }
      ok = 1
    :: else -> ok = 0
    fi;
    sb[me]!0, 0                          /* t->active.store(0, release) */
  fi
}

/* tryget_live(): percpu_add(1) || tryget_slow(true). */
inline tryget_live(ok) {
  t0 = confirmed;                        /* invoked after confirm? then it must fail */
  percpu_add(1, ok, 1);
  if
  :: ok -> skip
  :: else ->
#ifndef MUT_NO_LIVE_CHECK
    if
    :: (mode & M_DEAD) != 0 -> goto tl_fail
    :: else -> skip
    fi;
#endif
    empty(sb[me]);                       /* the CAS is locked */
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
#ifndef MUT_NO_LIVE_CHECK
    atomic {                             /* the second look at DEAD (seq_cst load) */
      if
      :: (mode & M_DEAD) != 0 -> dead = 1
      :: else -> dead = 0; held++; assert(!confirmed)
      fi
    };
    if
    :: dead ->
      put_atomic(now);                   /* back out our own increment */
      goto tl_fail
    :: else -> skip
    fi;
#else
    atomic { held++; assert(!confirmed) };
#endif
    ok = 1;
    goto tl_done;
tl_fail:
    ok = 0;
tl_done:
    skip
  fi;
  assert(!(ok && t0))
}

/* get(): the caller already holds a reference. */
inline get_ref() {
  percpu_add(1, ok, 2);
  if
  :: ok -> skip
  :: else ->
    empty(sb[me]);
    atomic { old = count; count++; held++ };
    assert(old > 0)                      /* get_undo never runs in correct use */
  fi
}

inline put_ref() {
  percpu_add(-1, ok, 3);
  if
  :: ok -> skip
  :: else ->
    held--;
    put_atomic(now)
  fi
}

proctype user(byte me) {
  bit ok, t0, dead; byte m; short tmp, old, now;
  tryget_live(ok);
  if
  :: ok ->
    if
#ifndef SMALL
    :: me == 0 ->                        /* user 0 also takes and drops a second reference */
#else
    :: false ->                          /* SMALL: the liveness run skips the second reference */
#endif
      get_ref();
      assert(released == 0);             /* the object is alive while held */
      put_ref()
    :: else -> skip
    fi;
    assert(released == 0);
    put_ref()
  :: else -> skip
  fi;
  done++
}

/* kill_and_confirm(confirm) with data_->mu held (only one mode changer: no mutex needed). */
proctype killer() {
  byte m, i; bit k; short v, sum, now;
  atomic { m = mode; mode = m | M_ATOMIC | M_DEAD };   /* mode_.store(seq_cst) */
  if
  :: (m & M_ATOMIC) == 0 ->
#if !defined(MUT_FOLD_BEFORE_BARRIER) && !defined(MUT_NO_BARRIER)
    heavy_barrier();
#endif
    /* Registry::collect(slot) */
    i = 0;
    do
    :: i < NU ->
      do                                  /* spin (sched_yield) while the reader is in flight */
      :: vis_active[i] == 0 -> break
      :: else -> skip
      od;
      sum = sum + vis_slot[i];
      vis_slot[i] = 0;
      i++
    :: else -> break
    od;
    atomic { count = count + sum; now = count - BIAS };   /* fold_locked: the bias still in */
#ifdef MUT_FOLD_BEFORE_BARRIER
    heavy_barrier();
#endif
    assert(now >= 1);                     /* the initial reference is still there (no misuse */
    atomic { count = count - BIAS }       /* here; the undo is checked in percpu_ref_rseq) */
  :: else ->
    now = count;                          /* an atomic-mode ref: count_.load */
    assert(now >= 1)
  fi;
  confirmed = 1;                          /* confirm() */
  atomic { held--; count--; now = count };   /* put_slow(1): the initial reference */
  if
  :: now == 0 -> run_release()
  :: else -> skip
  fi;
  done++
}

/* Drains store buffers in any order at any time; never needed for termination by itself. */
active proctype flusher() {
  bit k; short v;
end:
  do
  :: atomic { nempty(sb[0]) -> sb[0]?k, v; apply(0, k, v) }
  :: atomic { nempty(sb[1]) -> sb[1]?k, v; apply(1, k, v) }
  od
}

/* Once everybody finished: released exactly once, and the count is exactly zero. */
active proctype final_check() {
  (done == NU + 1);
  assert(released == 1 && held == 0 && count == 0)
}

init {
  atomic {
    run user(0);
    run user(1);
    run killer()
  }
}

/* Liveness (checked with pan -a -f: weak fairness): every wait of kill (the spin on `active`)
 * ends once its holders let go, and every operation returns. */
ltl terminates { <> (done == NU + 1) }
