/*
 * Sweep teardown with the FREEING sentinel (issue 9 §2, being rebuilt by the memory helper in
 * src/memory/dev_pagemap.cc: get_folio / put_refcount / folio_freed / sweep / memunmap):
 *
 *   get   : old = refcount.fetch_add(1); if old is FREEING, undo and retry (the folio is in its
 *           free path); if !alive: fetch_sub(1), wake if that made it 0, fail.
 *   put   : CAS loop; the last put moves 1 -> FREEING (a value the scan treats as busy), runs
 *           page_free (uses the pagemap), moves FREEING -> 0 (fetch_sub FREEING), then wakes; after
 *           the move to 0 it touches nothing of the pagemap (the wake-up hashes the address into
 *           the global wait table only).
 *   unmap : alive = false (seq_cst); scan every folio once, waiting (wait_var_event) until it
 *           reads 0; unpublish the pagemap; grace period; free the pagemap.
 *
 * Getters find the folio through a lookup: an RCU read section in which the pagemap is still
 * published (lookups counts getters inside it; the grace period waits for it to reach zero). A
 * folio reference, once taken, outlives the lookup: only the refcount and the scan protect it.
 * The model is sequentially consistent: every access named here is seq_cst in the code (the
 * Dekker pairing of the getter's fetch_add/alive load with the unmap's alive store/fence/scan).
 * The wait table is modelled as in include/pgmap/core/wait_table.h: the waiter registers under
 * the bucket mutex, checks, and sleeps releasing the mutex atomically (condition variable); the
 * waker loads the waiter count after its update and, if non-zero, notifies under the mutex. All
 * folios hash to one bucket here. Waits have no deadline (a lost wake-up is a hang).
 *
 * Mutants (each must be refuted):
 *   MUT_NO_FREEING         the last put moves 1 -> 0 and then runs page_free and the wake-up,
 *                          so the scan does not wait for the free path.
 *   MUT_CHECK_BEFORE_ADD   the get checks alive before its fetch_add.
 * Design questions the model answers (expected to be refuted, see docs/model.md):
 *   ALT_WAKE_BEFORE_ZERO   the free path wakes and then moves FREEING -> 0 (lost wake-up).
 *   ALT_STORE_ZERO         the free path ends with a plain store of 0 instead of a fetch_sub of
 *                          FREEING (a getter's transient increment on FREEING is erased).
 *   CHECK_PAGE_FREE_OWED   every busy period ends in exactly one page_free.
 */

#define NP 2           /* folios */
#define NG 2           /* getter threads */
#define FREEING 100    /* the sentinel: larger than any real count here */

byte r[NP];            /* the folio refcounts (the pagemap's hot array) */
bit alive = 1;         /* DevPagemap::alive_ */
bit published = 1;     /* the pagemap is in the registry */
byte lookups = 0;      /* getters inside their lookup read section */
bit freed = 0;         /* the pagemap and its metadata are gone */

/* the wait-table bucket */
bit wq_mu = 0;
byte waiters = 0;
bit sleeping = 0;

/* ghost */
byte holders[NP];      /* successful gets not yet put */
bit in_free[NP];       /* page_free running */
bit owed[NP];          /* the folio was busy; its page_free has not run yet */
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
  atomic { USE; in_free[p] = 1; owed[p] = 0 };
  atomic { USE; in_free[p] = 0 }
}

proctype getter(byte me) {
  byte p, old; bit last, t0;
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
retry:
  atomic { USE; old = r[p]; r[p]++ };    /* get_folio: fetch_add (seq_cst) */
  if
  :: old >= FREEING ->                   /* in its free path: undo, try again */
    atomic { USE; assert(r[p] > 0); r[p]-- };   /* the refcount never goes below zero */
    goto retry
  :: else -> skip
  fi;
#ifndef MUT_CHECK_BEFORE_ADD
  atomic {
    if
    :: !alive -> last = 1                /* (reusing `last` as "dead") */
    :: else -> last = 0; holders[p]++; owed[p] = 1
    fi
  };
  if
  :: last ->                             /* back out: fetch_sub, wake if that made it idle */
    atomic { USE; assert(r[p] > 0); r[p]--; last = (r[p] == 0) };
    if
    :: last -> wake()
    :: else -> skip
    fi;
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

  /* put_refcount: CAS loop */
  old = r[p];
  do
  :: atomic {
       USE;
       if
       :: r[p] == old ->
         assert(old > 0 && old < FREEING);
         holders[p]--;
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
  :: last ->                             /* folio_freed */
    page_free(p);
#if defined(MUT_NO_FREEING)
    atomic { USE };                      /* reads dying_/type_ to decide on the wake-up */
    wake()
#elif defined(ALT_WAKE_BEFORE_ZERO)
    wake();
    atomic { USE; r[p] = r[p] - FREEING }
#elif defined(ALT_STORE_ZERO)
    atomic { USE; r[p] = 0 };
    wake()
#else
    atomic { USE; r[p] = r[p] - FREEING };   /* FREEING -> 0: the last touch of the pagemap */
    wake()                                   /* address only: the global wait table */
#endif
  :: else -> skip
  fi;
out:
  done++
}

/* memunmap under sweep: kill (alive = false), sweep(), unpublish, grace period, free. */
proctype unmapper() {
  byte i;
  alive = 0;                             /* alive_.store(false, seq_cst) + full fence */
  i = 0;
  do
  :: i < NP ->
    if
    :: r[i] == 0 -> skip                 /* find_busy skips idle folios (FREEING is busy) */
    :: else ->                           /* wait_var_event(&r, r == 0) */
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
    fi;
    i++
  :: else -> break
  od;
  published = 0;                         /* PagemapRegistry::remove */
  (lookups == 0);                        /* the grace period */
  atomic {
    /* teardown never completes while a folio is busy */
    assert(holders[0] == 0 && holders[1] == 0 && !in_free[0] && !in_free[1]);
    assert(r[0] == 0 && r[1] == 0);
#ifdef CHECK_PAGE_FREE_OWED
    assert(!owed[0] && !owed[1]);
#endif
    freed = 1
  };
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
