/*
 * Sweep teardown with the FREEING sentinel, as built (strategies sweep and alloc_event share it):
 * src/memory/strategy/folio_refcount.h (checked_get, back_out, freeing_put, freeing_to_idle),
 * src/memory/strategy/access.h (wakes_on_idle), src/memory/dev_pagemap.cc (kill_locked,
 * memunmap, scan_and_wait). Step labels are the code's:
 *
 *   checked_get  G1  CAS old -> old + 1, REFUSED (nothing changed) when old is FREEING (the code
 *                    waits for P4 and retries: a refused attempt here, retried or not, covers it).
 *                G2  load life_; if killed: back_out (a put of a reference no successful get took):
 *                B1    load the count (acquire); if it is our add only, load the owed flag;
 *                B2    CAS: our add only -> FREEING if owed (then P2..P5: page_free), else -> 0;
 *                      otherwise old -> old - 1 (the flag is left as it is);
 *                B3    if it went to 0: wake (address only).
 *   freeing_put  P1a a put that is not the last sets the owed flag (kPageFreeOwed) before its CAS;
 *                P1  CAS loop; the last put moves 1 -> FREEING (the scan treats it as busy);
 *   freeing_to_idle
 *                P2  wake = wakes_on_idle() (killed; read BEFORE page_free and the store of 0);
 *                P3  page_free (uses the pagemap);
 *                P3b clear the owed flag;
 *                P4  store 0 (release): the last touch of the pagemap;
 *                P5  if wake: wake_up_var (hashes the address into the global wait table only).
 *   memunmap     kill_locked: life_ |= kKilled (seq_cst), full fence; scan_and_wait: every folio
 *                once; wait_idle: re-read; 0 -> next; FREEING -> timed wait (100 us) and re-read,
 *                because its putter may have read P2 before the kill and will not wake; a count ->
 *                wait_var_event until 0. Then PagemapRegistry::remove (unpublish + grace period),
 *                then the metadata is retired.
 *
 * Getters find the folio through a lookup: an RCU read section in which the pagemap is still
 * published (lookups counts getters inside it; the grace period waits for it to reach zero). A
 * folio reference, once taken, outlives the lookup: only the refcount and the scan protect it.
 * The model is sequentially consistent: the accesses that pair are seq_cst in the code (G1's CAS
 * and G2's life_ load against the kill's fetch_or, full fence and the scan's loads; P1 and P2).
 * The wait table is modelled as in include/pgmap/core/wait_table.h: the waiter registers under
 * the bucket mutex, checks, and sleeps releasing the mutex atomically (condition variable); the
 * waker loads the waiter count after its update and, if non-zero, notifies under the mutex. All
 * folios hash to one bucket. The timed wait on FREEING is modelled as a re-read (a wake-up only
 * makes it re-read sooner); the wait on a count has NO deadline here (the code's 10 ms slice is a
 * safety net the model does not rely on: a lost wake-up there is a hang).
 *
 * Checked: no touch of the pagemap after it is freed; the refcount never goes below zero or
 * changes while FREEING except by its putter; no get succeeds after the kill; teardown finds
 * every folio idle and no page_free running; every busy period that a successful get took part in
 * ends with page_free before the folio reads 0 again (ghost `owed`, set by every successful get,
 * cleared by page_free), and page_free runs only for such a busy period (no page_free without
 * `owed`: a busy period made only of backing-out adds frees nothing); the owed flag is clear
 * whenever the folio reads 0.
 *
 * Mutants (each must be refuted):
 *   MUT_NO_FREEING        the last put moves 1 -> 0, then runs page_free and the wake-up: the scan
 *                         does not wait for the free path (free path after 0).
 *   MUT_CHECK_BEFORE_ADD  the get checks alive before its add (G2 before G1).
 *   MUT_BACKOUT_SUB       back_out as a bare fetch_sub (+ wake if 0), never page_free: a busy
 *                         period ends without page_free.
 *   MUT_OLD_BACKOUT       the back_out before the owed flag: old == 0 (the folio was idle before
 *                         our add) -> fetch_sub, wake if 0, no page_free; old != 0 -> an ordinary
 *                         put (page_free if last). Defect A: B adds 0 -> 1, G gets 1 -> 2 and puts
 *                         2 -> 1, the kill, B backs out 1 -> 0: G's busy period ends without
 *                         page_free (and two back-outs alone ran a page_free for nothing).
 *   MUT_NO_OWED_MARK      non-last puts do not set the owed flag (P1a missing): the same trail.
 *   MUT_NO_POLL           the scan waits on a FREEING folio without a deadline (lost wake-up when
 *                         the putter read P2 before the kill).
 * LEAN: the lean protocol of a pagemap without a free path (no page_free, not FS_DAX; the code's
 *   lean_get / lean_put / lean_idle, with back_out's owed flag never set): G1 is a blind
 *   fetch_add (FREEING never occurs), the last put is L1 CAS 1 -> 0 then L2 a load of the
 *   process-wide killed count (killedc, raised by the kill before life_ and the scan; not the
 *   pagemap's memory, so no USE) and a wake-up if it is non-zero; there is no page_free, so the
 *   ghost `owed` is not kept. Checked as above (no touch after free, no get after the kill,
 *   teardown finds every folio idle), and the liveness claim now rests on L2's wake-up.
 *   MUT_LEAN_KILLED_BEFORE_CAS  L2's load before the CAS (the lost wake-up the count's position
 *                         after L1 prevents: the scan sleeps on a count whose last put did not wake).
 * Design alternatives (refuted; docs/model.md):
 *   ALT_WAKE_BEFORE_ZERO  P5 before P4 (lost wake-up for a scan waiting on a count).
 *   ALT_BLIND_ADD         G1 as a blind fetch_add, undone on FREEING (the spec's design): P4's
 *                         store of 0 erases the transient add, whose undo then underflows.
 */

#define NP 2           /* folios */
#define NG 2           /* getter threads */
#define FREEING 100    /* kFreeingRef: larger than any real count here */

byte r[NP];            /* the folio refcounts (the pagemap's hot array) */
bit alive = 1;         /* !(life_ & kKilled) */
bit published = 1;     /* the pagemap is in the registry */
byte lookups = 0;      /* getters inside their lookup read section */
bit freed = 0;         /* the pagemap and its metadata are gone */
bit killedc = 0;       /* LEAN: DevPagemap::killed_pagemaps_ != 0 (static storage: never freed) */

/* the wait-table bucket */
bit wq_mu = 0;
byte waiters = 0;
bit sleeping = 0;

/* ghost */
byte holders[NP];      /* successful gets not yet put */
bit in_free[NP];       /* page_free running */
bit owed[NP];          /* a successful get took part in the busy period; page_free not run yet */
bit owedf[NP];         /* the code's kPageFreeOwed flag (PageArray::flags) */
byte done = 0;

/* Any touch of the pagemap's memory: its metadata (refcounts included) and its callbacks. */
#define USE assert(!freed)

inline wake() {
  /* wake_up_var(&r[p]): full fence, load the waiter count, notify under the bucket mutex */
  if
  :: waiters == 0 -> skip
  :: else ->
    atomic { wq_mu == 0 -> wq_mu = 1 };
    sleeping = 0;
    wq_mu = 0
  fi
}

inline page_free(p) {
  atomic { USE; assert(owed[p]); in_free[p] = 1; owed[p] = 0 };
  atomic { USE; in_free[p] = 0 }
}

/* freeing_to_idle: P2..P5 (P1 made the refcount FREEING). */
inline freeing_to_idle(p) {
  atomic { USE; wk = !alive };           /* P2: wakes_on_idle() */
  page_free(p);                          /* P3 */
#if defined(ALT_WAKE_BEFORE_ZERO)
  if
  :: wk -> wake()
  :: else -> skip
  fi;
  owedf[p] = 0;                          /* P3b */
  atomic { USE; assert(r[p] == FREEING); assert(!owed[p]); r[p] = 0 }
#else
  atomic { USE; owedf[p] = 0 };          /* P3b */
  atomic { USE; assert(r[p] == FREEING); assert(!owed[p]); r[p] = 0 };   /* P4 */
  if                                     /* P5: address only */
  :: wk -> wake()
  :: else -> skip
  fi
#endif
}

#ifdef LEAN
/* lean_put of one reference: plain_put's CAS loop (L1), then L2. */
inline freeing_put(p) {
  old = r[p];                            /* relaxed load */
#ifdef MUT_LEAN_KILLED_BEFORE_CAS
  wk = killedc;
#endif
  do
  :: atomic {                            /* L1: CAS */
       USE;
       if
       :: r[p] == old ->
         assert(old > 0 && old < FREEING);
         if
         :: held -> holders[p]--
         :: else -> skip
         fi;
         if
         :: old == 1 -> r[p] = 0; last = 1
         :: else -> r[p] = old - 1; last = 0
         fi;
         break
       :: else -> old = r[p]
       fi
     }
  od;
#ifndef MUT_LEAN_KILLED_BEFORE_CAS
  wk = killedc;                          /* L2: the process-wide count, not the pagemap */
#endif
  if
  :: last && wk -> wake()
  :: else -> skip
  fi
}

/* back_out without the owed flag: our add only -> 0 (wake), else old -> old - 1. */
inline back_out(p) {
  do
  :: atomic { USE; old = r[p] };         /* B1 */
    atomic {                             /* B2: CAS */
      USE;
      if
      :: r[p] == old ->
        assert(old > 0 && old < FREEING);
        if
        :: old == 1 -> r[p] = 0; zero = 1
        :: else -> r[p] = old - 1; zero = 0
        fi;
        break
      :: else -> skip
      fi
    }
  od;
  if
  :: zero -> wake()                      /* B3 */
  :: else -> skip
  fi
}
#else
/* freeing_put of one reference (held: a successful get's, else a backing-out get's own add). */
inline freeing_put(p) {
  old = r[p];                            /* relaxed load */
  do
  ::
#if !defined(MUT_NO_OWED_MARK) && !defined(MUT_OLD_BACKOUT)
    if                                   /* P1a: not the last put: the busy period owes page_free */
    :: held && old != 1 -> atomic { USE; owedf[p] = 1 }
    :: else -> skip
    fi;
#endif
    atomic {                             /* P1: CAS */
       USE;
       if
       :: r[p] == old ->
         assert(old > 0 && old < FREEING);
         if
         :: held -> holders[p]--
         :: else -> skip
         fi;
         if
#ifndef MUT_NO_FREEING
         :: old == 1 -> r[p] = FREEING; last = 1
#else
         :: old == 1 -> r[p] = 0; last = 1
#endif
         :: else -> r[p] = old - 1; last = 0
         fi;
         break
       :: else -> old = r[p]
       fi
     }
  od;
  if
  :: last ->
#ifndef MUT_NO_FREEING
    freeing_to_idle(p)
#else
    atomic { USE; wk = !alive };
    page_free(p);
    if
    :: wk -> wake()
    :: else -> skip
    fi
#endif
  :: else -> skip
  fi
}

/* back_out: a put of the getter's own add, which no successful get took (B1..B3). */
inline back_out(p) {
  do
  :: atomic { USE; old = r[p] };         /* B1: load (acquire) */
    atomic { USE; owd = owedf[p] };       /*     the owed flag (the code reads it when old == 1) */
    atomic {                             /* B2: CAS */
      USE;
      if
      :: r[p] == old ->
        assert(old > 0 && old < FREEING);
        if
        :: old == 1 && owd -> r[p] = FREEING; last = 1; zero = 0
        :: old == 1 && !owd ->
          assert(!owed[p] && !owedf[p]);   /* idle again: no busy period is left owing */
          r[p] = 0; last = 0; zero = 1
        :: else -> r[p] = old - 1; last = 0; zero = 0
        fi;
        break
      :: else -> skip
      fi
    }
  od;
  if
  :: last -> freeing_to_idle(p)          /* P2..P5 for the busy period's successful gets */
  :: zero -> wake()                      /* B3 */
  :: else -> skip
  fi
}

#endif  /* LEAN */

proctype getter(byte me) {
  byte p, old; bit last, t0, dead, held, wk, owd, zero;
  if
  :: p = 0
  :: p = 1
  fi;
  t0 = !alive;                           /* invoked after the kill? then the get must fail */
  atomic {                               /* lookup: rcu read section + registry lookup */
    if
    :: published -> lookups++
    :: else -> goto out
    fi
  };
#ifdef MUT_CHECK_BEFORE_ADD
  if
  :: !alive -> lookups--; goto out
  :: else -> skip
  fi;
#endif
#if defined(LEAN)
  atomic { USE; old = r[p]; assert(old < FREEING); r[p]++ };   /* L0: fetch_add */
#elif !defined(ALT_BLIND_ADD)
  atomic {                               /* G1: CAS loop, refused on FREEING */
    USE;
    old = r[p];
    if
    :: old >= FREEING -> skip            /* refused_get: Errc::busy, nothing changed */
    :: else -> r[p]++
    fi
  };
  if
  :: old >= FREEING -> lookups--; goto out
  :: else -> skip
  fi;
#else
  atomic { USE; old = r[p]; r[p]++ };    /* G1 as a blind fetch_add */
  if
  :: old >= FREEING ->                   /* undo and fail */
    atomic { USE; assert(r[p] > 0); r[p]-- };
    lookups--;
    goto out
  :: else -> skip
  fi;
#endif
#ifndef MUT_CHECK_BEFORE_ADD
  atomic {                               /* G2: life_ load */
    dead = !alive;
    if
#ifdef LEAN
    :: !dead -> holders[p]++             /* no page_free: nothing is owed */
#else
    :: !dead -> holders[p]++; owed[p] = 1
#endif
    :: else -> skip
    fi
  };
  if
  :: dead ->
    held = 0;
#if defined(MUT_OLD_BACKOUT)
    if                                   /* the back_out before the owed flag */
    :: old != 0 -> freeing_put(p)
    :: else ->
#endif
#if defined(MUT_OLD_BACKOUT) || defined(MUT_BACKOUT_SUB)
      atomic {
        USE; assert(r[p] > 0 && r[p] < FREEING); r[p]--; last = (r[p] == 0);
        assert(!last || !owed[p])          /* idle again: no busy period is left owing */
      };
      if
      :: last -> wake()
      :: else -> skip
      fi
#endif
#if defined(MUT_OLD_BACKOUT)
    fi;
#endif
#if !defined(MUT_OLD_BACKOUT) && !defined(MUT_BACKOUT_SUB)
    back_out(p);
#endif
    lookups--;
    goto out
  :: else -> skip
  fi;
#else
  atomic { holders[p]++; owed[p] = 1 };
#endif
  assert(!t0);                           /* no folio becomes busy after the kill */
  lookups--;                             /* the lookup ends; the folio reference lives on */

  atomic { USE; assert(r[p] > 0 && r[p] < FREEING) };   /* use the folio */

  held = 1;
  freeing_put(p);                        /* put_folio */
out:
  done++
}

/* memunmap under sweep: kill, scan_and_wait, unpublish + grace period, retire. */
proctype unmapper() {
  byte i, v;
  killedc = 1;                           /* kill_locked: killed_pagemaps_ += 1 (seq_cst) */
  alive = 0;                             /* kill_locked: life_.fetch_or(kKilled) + full fence */
  i = 0;
  do
  :: i < NP ->
    do                                   /* wait_idle */
    :: v = r[i];
      if
      :: v == 0 -> break
#ifndef MUT_NO_POLL
      :: v >= FREEING -> skip            /* timed wait (100 us), then re-read */
      :: v > 0 && v < FREEING ->
#else
      :: else ->
#endif
        /* wait_var_event(&r, r == 0) */
        atomic { wq_mu == 0 -> wq_mu = 1 };
        waiters++;
        do
        :: r[i] == 0 -> break
        :: else ->
          atomic { sleeping = 1; wq_mu = 0 };              /* cv.wait: unlock and sleep */
          atomic { sleeping == 0 && wq_mu == 0 -> wq_mu = 1 }   /* woken, relock */
        od;
        waiters--;
        wq_mu = 0
      fi
    od;
    i++
  :: else -> break
  od;
  published = 0;                         /* PagemapRegistry::remove */
  (lookups == 0);                        /* the grace period */
  atomic {
    /* teardown never completes while a folio is busy or owes its page_free */
    assert(holders[0] == 0 && holders[1] == 0 && !in_free[0] && !in_free[1]);
    assert(r[0] == 0 && r[1] == 0);
    assert(!owed[0] && !owed[1]);
    freed = 1
  };
  killedc = 0;                           /* torn down: no longer counted */
  done++
}

init {
  atomic {
    run getter(0);
    run getter(1);
    run unmapper()
  }
}

/* Liveness (pan -a -f): the scan's waits and the getters' retries end when the holders let go. */
ltl terminates { <> (done == NG + 1) }
