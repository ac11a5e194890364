use super::*;

fn cfg(num_blocks: usize, budget: usize, max_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        block_size: 4,
        num_blocks,
        enable_prefix_caching: true,
        policy: SchedulingPolicy::Fcfs,
    }
}

/// Runs a step as the engine would: complete it, then append a token to every sampling sequence.
fn step(s: &mut Scheduler, next_token: u32) -> Schedule {
    let sched = s.schedule();
    s.complete(&sched);
    for item in &sched.seqs {
        if item.samples {
            s.append_token(item.id, next_token);
        }
    }
    sched
}

#[test]
fn long_prompts_are_chunked_and_decodes_go_first() {
    let mut s = Scheduler::new(cfg(64, 8, 8));
    s.add(Sequence::new(1, 1, vec![1; 5]));
    let first = step(&mut s, 9);
    assert_eq!(first.seqs, vec![ScheduledSeq { id: 1, start: 0, len: 5, samples: true, draft: 0 }]);
    s.add(Sequence::new(2, 2, (0..20).collect()));
    // Sequence 1 decodes one token; sequence 2 gets the remaining 7 of the budget.
    let second = step(&mut s, 9);
    assert_eq!(second.seqs[0], ScheduledSeq { id: 1, start: 5, len: 1, samples: true, draft: 0 });
    assert_eq!(second.seqs[1], ScheduledSeq { id: 2, start: 0, len: 7, samples: false, draft: 0 });
    let third = step(&mut s, 9);
    assert_eq!(third.seqs[1], ScheduledSeq { id: 2, start: 7, len: 7, samples: false, draft: 0 });
    let fourth = step(&mut s, 9);
    assert_eq!(fourth.seqs[1], ScheduledSeq { id: 2, start: 14, len: 6, samples: true, draft: 0 });
    assert_eq!(s.get(2).unwrap().tokens.len(), 21);
}

#[test]
fn at_most_max_num_seqs_run_together() {
    let mut s = Scheduler::new(cfg(64, 100, 2));
    for id in 0..4 {
        s.add(Sequence::new(id, id, vec![1, 2, 3]));
    }
    let sched = step(&mut s, 5);
    assert_eq!(sched.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 2));
    s.remove(0);
    let sched = step(&mut s, 5);
    assert_eq!(sched.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn a_shared_prompt_prefix_is_computed_once() {
    let mut s = Scheduler::new(cfg(64, 100, 8));
    let prompt: Vec<u32> = (0..10).collect();
    s.add(Sequence::new(1, 1, prompt.clone()));
    step(&mut s, 99);
    // Same 10 tokens: 2 full blocks (8 tokens) are cached; the last block is partial.
    s.add(Sequence::new(2, 2, prompt.clone()));
    let sched = step(&mut s, 99);
    let second = sched.seqs.iter().find(|x| x.id == 2).unwrap();
    assert_eq!((second.start, second.len), (8, 2));
    assert_eq!(s.get(1).unwrap().blocks[..2], s.get(2).unwrap().blocks[..2]);
    assert_eq!(s.get(2).unwrap().cached_prompt_tokens, 8);
    let stats = s.prefix_cache_stats();
    assert_eq!((stats.queries, stats.hits), (20, 8));
    // A prompt that is exactly cached still recomputes its last token.
    s.add(Sequence::new(3, 3, prompt[..8].to_vec()));
    let sched = step(&mut s, 99);
    let third = sched.seqs.iter().find(|x| x.id == 3).unwrap();
    assert_eq!((third.start, third.len), (4, 4));
}

#[test]
fn finished_sequences_leave_their_blocks_findable() {
    let mut s = Scheduler::new(cfg(8, 100, 8));
    s.add(Sequence::new(1, 1, (0..9).collect()));
    step(&mut s, 1);
    s.remove(1);
    assert_eq!(s.pool().num_free(), 8);
    s.add(Sequence::new(2, 2, (0..9).collect()));
    let sched = step(&mut s, 1);
    assert_eq!(sched.seqs[0].start, 8);
}

#[test]
fn preempts_newest_sequence_when_blocks_run_out() {
    // 4 blocks of 4 tokens; two 8-token prompts fill them exactly.
    let mut s = Scheduler::new(cfg(4, 100, 8));
    s.add(Sequence::new(1, 1, vec![1; 8]));
    s.add(Sequence::new(2, 2, vec![2; 8]));
    step(&mut s, 3); // both prefill and sample: 9 tokens each, 8 in the cache
    assert_eq!(s.pool().num_free(), 0);
    let sched = step(&mut s, 3); // sequence 1 needs a third block: sequence 2 is preempted
    assert_eq!(sched.preempted, vec![2]);
    assert_eq!(sched.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
    let victim = s.get(2).unwrap();
    assert_eq!((victim.num_computed, victim.tokens.len(), victim.blocks.len()), (0, 9, 0));
    assert_eq!(s.num_preemptions(), 1);
    // Sequence 1 took the victim's last block (evicted first); its first block stays cached.
    // Once sequence 1 finishes, sequence 2 recomputes the rest of its 9 tokens, prompt and output.
    s.remove(1);
    let sched = step(&mut s, 3);
    assert_eq!(sched.seqs, vec![ScheduledSeq { id: 2, start: 4, len: 5, samples: true, draft: 0 }]);
    assert_eq!(s.get(2).unwrap().tokens.len(), 10);
}

#[test]
fn a_lone_sequence_that_outgrows_the_cache_preempts_itself_instead_of_looping() {
    let mut s = Scheduler::new(cfg(2, 100, 8));
    s.add(Sequence::new(1, 1, vec![1; 8]));
    step(&mut s, 1);
    let sched = s.schedule();
    assert_eq!(sched.preempted, vec![1]);
    assert!(sched.seqs.is_empty());
}

#[test]
fn forked_children_share_full_prompt_blocks_and_recompute_the_tail() {
    let mut s = Scheduler::new(cfg(16, 100, 8));
    s.add(Sequence::new(1, 1, (0..10).collect()));
    let sched = s.schedule();
    s.complete(&sched);
    s.append_token(1, 50);
    s.fork(1, 2, 51);
    let (p, c) = (s.get(1).unwrap().clone(), s.get(2).unwrap().clone());
    assert_eq!(c.blocks, p.blocks[..2].to_vec());
    assert_eq!(s.pool().ref_count(p.blocks[0]), 2);
    assert_eq!(c.tokens[10], 51);
    let sched = s.schedule();
    let child = sched.seqs.iter().find(|x| x.id == 2).unwrap();
    assert_eq!((child.start, child.len, child.samples), (8, 3, true));
}

/// A deterministic mix of arrivals, steps, finishes, aborts, forks and preemptions; afterwards
/// every block must be free (or free and cached), never leaked.
#[test]
fn no_block_leaks_after_any_mix_of_finish_abort_fork_and_preemption() {
    no_block_leaks_under(SchedulingPolicy::Fcfs, false);
}

#[test]
fn no_block_leaks_under_the_priority_policy_either() {
    no_block_leaks_under(SchedulingPolicy::Priority, false);
}

#[test]
fn no_block_leaks_with_tenants_sharing_slots() {
    no_block_leaks_under(SchedulingPolicy::Fcfs, true);
    no_block_leaks_under(SchedulingPolicy::Priority, true);
}

/// Random adds (of random priority classes), finishes, aborts, forks and steps; the pool stays
/// consistent and the running and waiting queues stay in priority order.
fn no_block_leaks_under(policy: SchedulingPolicy, tenants: bool) {
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 6,
        max_num_batched_tokens: 24,
        block_size: 4,
        num_blocks: 24,
        enable_prefix_caching: true,
        policy,
    });
    let mut ids = 0u64;
    let mut preemptions = 0;
    for _ in 0..3000 {
        match next(10) {
            0..=2 => {
                ids += 1;
                let len = 1 + next(30) as usize;
                let base = next(3) as u32 * 100; // shared prefixes across some sequences
                let class = if policy == SchedulingPolicy::Priority { next(3) as i64 - 1 } else { 0 };
                let mut seq = of_class(ids, class, (0..len as u32).map(|t| base + t % 7).collect());
                if tenants {
                    // Three tenants of weights 1, 2, 3 and requests without one.
                    let t = next(4) as u32;
                    seq.tenant = (t > 0).then(|| std::sync::Arc::from(format!("t{t}").as_str()));
                    seq.tenant_weight = t;
                }
                s.add(seq);
            }
            3 => {
                let live: Vec<SeqId> = s.seqs.keys().copied().collect();
                if !live.is_empty() {
                    s.remove(live[next(live.len() as u64) as usize]);
                }
            }
            4 if s.num_running() > 0 => {
                let parent = s.running[next(s.running.len() as u64) as usize];
                if s.get(parent).unwrap().num_computed >= s.get(parent).unwrap().prompt_len {
                    ids += 1;
                    s.fork(parent, ids, 7);
                }
            }
            _ => {
                let sched = step(&mut s, next(50) as u32);
                preemptions += sched.preempted.len();
                // Sequences that grew long finish.
                let long: Vec<SeqId> = s.seqs.values().filter(|q| q.tokens.len() > 40).map(|q| q.id).collect();
                for id in long {
                    s.remove(id);
                }
            }
        }
        s.pool.check_invariants().unwrap();
        let key = |id: &SeqId| s.seqs[id].priority;
        assert!(s.running.iter().map(key).is_sorted() && s.waiting.iter().map(key).is_sorted(), "queues in order");
        let in_use: usize = s.seqs.values().map(|q| q.blocks.len()).sum();
        assert!(s.pool.num_blocks() - s.pool.num_free() <= in_use);
        let tenanted = s.seqs.values().filter(|q| q.tenant.is_some()).count();
        assert_eq!(s.tenanted, tenanted, "the count of tenanted sequences is kept");
        if tenanted == 0 {
            assert!(s.tenant_slots.is_empty() && s.admitted_at.is_empty(), "no tenant is remembered");
        }
        for q in s.seqs.values() {
            assert_eq!(q.tenant.as_ref().map(|t| s.tenant_slots[t]).unwrap_or(0), q.tenant_slot);
        }
    }
    assert!(preemptions > 0, "the mix should exercise preemption");
    let live: Vec<SeqId> = s.seqs.keys().copied().collect();
    for id in live {
        s.remove(id);
    }
    s.pool.check_invariants().unwrap();
    assert_eq!(s.pool.num_free(), s.pool.num_blocks());
}

fn wanting_prompt_rows(id: SeqId, prompt: Vec<u32>) -> Sequence {
    let mut seq = Sequence::new(id, id, prompt);
    seq.prompt_logprobs = true;
    seq
}

#[test]
fn prompt_rows_are_asked_once_per_position_and_capped_per_step() {
    let n = MAX_PROMPT_ROWS_PER_STEP + 100;
    let mut s = Scheduler::new(cfg(1024, 4 * n, 8));
    s.add(wanting_prompt_rows(1, (0..n as u32).collect()));
    let first = step(&mut s, 1);
    // The chunk stops where the step's rows run out.
    assert_eq!(
        first.seqs,
        vec![ScheduledSeq { id: 1, start: 0, len: MAX_PROMPT_ROWS_PER_STEP, samples: false, draft: 0 }]
    );
    assert_eq!(first.prompt_rows, vec![(1, 0..MAX_PROMPT_ROWS_PER_STEP)]);
    let batch = s.build_batch(&first);
    assert_eq!(batch.logits_rows, (0..MAX_PROMPT_ROWS_PER_STEP).collect::<Vec<_>>());
    // The rest: rows up to the one before the last prompt token, then the sampling row first.
    let second = s.schedule();
    assert_eq!(second.prompt_rows, vec![(1, MAX_PROMPT_ROWS_PER_STEP..n - 1)]);
    let batch = s.build_batch(&second);
    assert_eq!(batch.logits_rows[0], 99, "the sampling row comes first");
    assert_eq!(batch.logits_rows.len(), 1 + 99);
    assert_eq!(batch.logits_rows[1..], (0..99).collect::<Vec<_>>());
}

/// A sequence in chunked prefill with prompt rows that must preempt itself for lack of blocks
/// takes none of the step's rows: the step lists rows only of sequences it runs.
#[test]
fn a_sequence_that_preempts_itself_leaves_no_prompt_rows_in_the_step() {
    let mut s = Scheduler::new(cfg(3, 8, 8));
    s.add(Sequence::new(1, 1, vec![1, 2, 3, 4]));
    s.add(wanting_prompt_rows(2, (10..30).collect()));
    step(&mut s, 5); // 1's prompt (one block) and 4 of 2's (one block)
    // 1 decodes into a second block (the last free one); 2's next chunk needs two more.
    let sched = s.schedule();
    assert_eq!(sched.preempted, vec![2]);
    assert!(sched.prompt_rows.iter().all(|(id, _)| sched.seqs.iter().any(|q| q.id == *id)), "{sched:?}");
    let batch = s.build_batch(&sched);
    assert_eq!(batch.logits_rows, vec![0], "only 1's sampling row");
}

#[test]
fn prompt_rows_skip_the_prefix_cache_and_are_not_repeated_after_preemption() {
    let mut s = Scheduler::new(cfg(8, 100, 8));
    s.add(Sequence::new(1, 1, (0..9).collect()));
    step(&mut s, 1);
    s.remove(1); // its two full blocks stay findable
    s.add(wanting_prompt_rows(2, (0..9).collect()));
    let sched = step(&mut s, 1);
    assert_eq!(sched.seqs[0].start, 0, "no block read from the cache");
    assert_eq!(sched.prompt_rows, vec![(2, 0..8)]);
    // Recomputed after preemption: the prompt's rows were produced, so none are asked again,
    // and the cache may serve the recompute.
    s.preempt(2);
    let sched = step(&mut s, 1);
    assert_eq!(sched.prompt_rows, vec![]);
    assert_eq!(sched.seqs[0].start, 8, "the recompute reads the cached blocks");
}

#[test]
fn a_pooling_sequence_gets_each_pooled_row_once_across_chunks_and_preemption() {
    // 4 blocks of 4 tokens, 6 tokens a step: a generating sequence grows beside a 10-token
    // mean-pooling prompt until the prompt, the newest, is preempted mid-prefill.
    let mut s = Scheduler::new(cfg(4, 6, 8));
    s.add(Sequence::new(1, 1, vec![1; 4]));
    let mut pooled = Sequence::new(2, 2, (10..20).collect());
    pooled.pooling = true;
    pooled.hidden_pending = 0..10;
    s.add(pooled);
    let (mut rows, mut preempted) = (Vec::new(), false);
    for _ in 0..20 {
        let sched = s.schedule();
        let batch = s.build_batch(&sched);
        s.complete(&sched);
        if sched.seqs.iter().any(|x| x.id == 1 && x.samples) {
            s.append_token(1, 7);
        }
        if sched.preempted.contains(&2) {
            preempted = true;
            s.remove(1); // the generating sequence finishes: room for the recompute
        }
        assert!(sched.seqs.iter().all(|x| x.id != 2 || !x.samples), "a pooling sequence never samples");
        assert_eq!(batch.hidden_rows.len(), sched.hidden_rows.iter().map(|(_, r)| r.len()).sum::<usize>());
        for (id, positions) in &sched.hidden_rows {
            assert_eq!(*id, 2);
            let at = sched.seqs.iter().position(|x| x.id == 2).expect("scheduled");
            let (first, start) = (batch.seqs[at].query_start, sched.seqs[at].start);
            for p in positions.clone() {
                assert!(batch.hidden_rows.contains(&(first + p - start)), "row of position {p} asked for");
                rows.push(p);
            }
        }
        if s.get(2).is_some_and(|q| q.num_computed == 10) {
            break;
        }
    }
    assert!(preempted, "the pooling prompt was preempted and recomputed");
    assert_eq!(rows, (0..10).collect::<Vec<_>>(), "every pooled position exactly once, in order");
    assert!(s.get(2).unwrap().hidden_pending.is_empty());
}

#[test]
fn a_pooling_sequence_reads_only_cached_blocks_before_its_first_pooled_position() {
    let mut s = Scheduler::new(cfg(64, 100, 8));
    let prompt: Vec<u32> = (0..10).collect();
    s.add(Sequence::new(1, 1, prompt.clone()));
    step(&mut s, 99);
    let pooling = |id, hidden: std::ops::Range<usize>| {
        let mut q = Sequence::new(id, id, prompt.clone());
        q.pooling = true;
        q.hidden_pending = hidden;
        q
    };
    s.add(pooling(2, 0..10)); // mean: every row, so nothing from the cache
    s.add(pooling(3, 9..10)); // last token: the cached full blocks are fine
    let sched = step(&mut s, 99);
    let start = |id| sched.seqs.iter().find(|x| x.id == id).unwrap().start;
    assert_eq!((start(2), start(3)), (0, 8));
    assert_eq!(sched.hidden_rows, vec![(2, 0..10), (3, 9..10)]);
}

#[test]
fn a_prompt_limit_caps_chunks_only_in_steps_that_carry_decodes() {
    let mut s = Scheduler::new(cfg(256, 64, 8));
    // Alone, a prompt takes the whole budget: the limit applies to steps with decodes only.
    s.add(Sequence::new(1, 1, vec![1; 40]));
    let limit = |decodes: usize| (decodes > 0).then_some(6);
    let first = s.schedule_limited(limit);
    assert_eq!(first.seqs, vec![ScheduledSeq { id: 1, start: 0, len: 40, samples: true, draft: 0 }]);
    s.complete(&first);
    s.append_token(1, 9);
    // Two prompts arrive while sequence 1 decodes: its token goes first, the prompts share 6.
    s.add(Sequence::new(2, 2, vec![2; 20]));
    s.add(Sequence::new(3, 3, vec![3; 20]));
    let second = s.schedule_limited(limit);
    assert_eq!(second.seqs[0], ScheduledSeq { id: 1, start: 40, len: 1, samples: true, draft: 0 });
    assert_eq!(second.seqs[1], ScheduledSeq { id: 2, start: 0, len: 6, samples: false, draft: 0 });
    assert_eq!(second.seqs.len(), 2, "the limit is spent: sequence 3 waits");
    s.complete(&second);
    s.append_token(1, 9);
    // The running chunk of sequence 2 is limited too, and the waiting prompt gets nothing.
    let third = s.schedule_limited(limit);
    let lens: Vec<(SeqId, usize)> = third.seqs.iter().map(|q| (q.id, q.len)).collect();
    assert_eq!(lens, vec![(1, 1), (2, 6)]);
    // Without a limit, the same state fills the budget.
    let unlimited = s.schedule();
    let prompt_tokens: usize = unlimited.seqs.iter().filter(|q| q.id != 1).map(|q| q.len).sum();
    assert_eq!(prompt_tokens, 14 + 20, "sequence 2's remaining 14 and all of sequence 3");
}

fn of_class(id: SeqId, class: i64, prompt: Vec<u32>) -> Sequence {
    let mut seq = Sequence::new(id, id, prompt);
    seq.priority.0 = class;
    seq
}

#[test]
fn the_priority_policy_admits_lower_classes_first_then_by_arrival() {
    let mut s = Scheduler::new(SchedulerConfig { policy: SchedulingPolicy::Priority, ..cfg(64, 100, 2) });
    s.add(of_class(1, 5, vec![1; 3]));
    s.add(of_class(2, 0, vec![2; 3]));
    s.add(of_class(3, 5, vec![3; 3]));
    s.add(of_class(4, -1, vec![4; 3]));
    let sched = step(&mut s, 9);
    assert_eq!(sched.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![4, 2]);
    s.remove(4);
    s.remove(2);
    let sched = step(&mut s, 9);
    assert_eq!(sched.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 3], "same class: arrival order");
}

/// Two class-1 sequences fill the cache (4 blocks of 4); a class-0 one arrives.
fn full_cache_then_a_better_class(policy: SchedulingPolicy) -> (Scheduler, Schedule) {
    let mut s = Scheduler::new(SchedulerConfig { policy, ..cfg(4, 100, 8) });
    s.add(of_class(1, 1, vec![1; 6]));
    s.add(of_class(2, 1, vec![2; 6]));
    step(&mut s, 9);
    assert_eq!(s.pool().num_free(), 0);
    s.add(of_class(3, 0, vec![3; 6]));
    let sched = step(&mut s, 9);
    (s, sched)
}

#[test]
fn a_waiting_sequence_of_a_better_class_preempts_the_newest_of_a_worse_one_when_the_cache_is_full() {
    let (s, sched) = full_cache_then_a_better_class(SchedulingPolicy::Priority);
    assert_eq!(sched.preempted, vec![2], "only as many as the newcomer's first chunk needs");
    let ran: Vec<_> = sched.seqs.iter().map(|x| (x.id, x.len)).collect();
    assert_eq!(ran, vec![(1, 1), (3, 6)], "the older class-1 sequence keeps decoding; the class-0 one is admitted");
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    assert_eq!(s.get(2).unwrap().num_computed, 0, "the preempted sequence is recomputed later");
}

#[test]
fn under_fcfs_a_full_cache_makes_a_newcomer_wait() {
    let (s, sched) = full_cache_then_a_better_class(SchedulingPolicy::Fcfs);
    assert!(sched.preempted.is_empty());
    assert_eq!(sched.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn a_sequence_of_the_same_or_a_worse_class_never_preempts() {
    let mut s = Scheduler::new(SchedulerConfig { policy: SchedulingPolicy::Priority, ..cfg(4, 100, 8) });
    s.add(of_class(1, 0, vec![1; 6]));
    s.add(of_class(2, 1, vec![2; 6]));
    step(&mut s, 9);
    s.add(of_class(3, 1, vec![3; 6]));
    let sched = step(&mut s, 9);
    assert!(sched.preempted.is_empty());
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn only_sequences_with_the_same_cache_salt_share_cached_blocks() {
    let mut s = Scheduler::new(cfg(64, 100, 8));
    let prompt: Vec<u32> = (0..13).collect();
    let salted = |id: SeqId, salt: Option<&str>| {
        let mut seq = Sequence::new(id, id, prompt.clone());
        seq.salt = salt.map(BlockHash::of_salt);
        seq
    };
    s.add(salted(1, Some("team-a")));
    step(&mut s, 9);
    s.remove(1);
    for (id, salt, hits) in [(2, Some("team-b"), 0), (3, None, 0), (4, Some("team-a"), 12)] {
        s.add(salted(id, salt));
        step(&mut s, 9);
        assert_eq!(s.get(id).unwrap().cached_prompt_tokens, hits, "salt {salt:?}");
        s.remove(id);
    }
}
