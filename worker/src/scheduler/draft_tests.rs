use crate::scheduler::{Scheduler, SchedulerConfig, SchedulingPolicy, Sequence};

fn cfg(num_blocks: usize, budget: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: budget,
        block_size: 4,
        num_blocks,
        enable_prefix_caching: true,
        policy: SchedulingPolicy::Fcfs,
    }
}

/// Sequences `ids` (6-token prompts) prefilled together and one token sampled each: decoding.
fn decoding(s: &mut Scheduler, ids: &[u64]) {
    for &id in ids {
        s.add(Sequence::new(id, id, vec![1, 2, 3, 4, 5, 6]));
    }
    let sched = s.schedule();
    s.complete(&sched);
    for &id in ids {
        s.append_token(id, 20);
    }
}

#[test]
fn a_draft_runs_with_its_token_and_resolves_to_the_accepted_prefix_freeing_what_only_it_needed() {
    let mut s = Scheduler::new(cfg(16, 64));
    decoding(&mut s, &[1]);
    let free_before = s.pool().num_free();
    assert!(s.set_draft(1, &[21, 22, 23, 24, 25, 26]));
    assert!(!s.set_draft(1, &[7]), "one draft at a time");
    let sched = s.schedule();
    assert_eq!((sched.seqs[0].start, sched.seqs[0].len, sched.seqs[0].draft), (6, 7, 6));
    let batch = s.build_batch(&sched);
    assert_eq!(batch.logits_rows, (0..7).collect::<Vec<_>>(), "a row for the token and each draft token");
    s.complete(&sched);
    let seq = s.get(1).unwrap();
    assert_eq!((seq.num_computed, seq.blocks.len()), (13, 4));
    assert_eq!(seq.block_hashes.len(), 1, "only verified positions are findable: (13 - 6) / 4 blocks");
    assert_eq!(s.pool().num_free(), free_before - 2);
    // Two accepted: tokens 20 21 22 stay computed, the rest go with the blocks only they used.
    s.resolve_draft(1, 2);
    let seq = s.get(1).unwrap();
    assert_eq!((seq.tokens.len(), seq.num_computed, seq.draft), (9, 9, 0));
    assert_eq!(&seq.tokens[6..], &[20, 21, 22]);
    assert_eq!(seq.blocks.len(), 3, "room for the next token");
    assert_eq!(s.pool().num_free(), free_before - 1);
    s.append_token(1, 30);
    let next = s.schedule();
    assert_eq!((next.seqs[0].start, next.seqs[0].len, next.seqs[0].draft), (9, 1, 0));
    s.complete(&next);
    assert_eq!(s.get(1).unwrap().block_hashes.len(), 2, "verified blocks are hashed as they fill");
    s.remove(1);
    assert_eq!(s.pool().num_free(), 16, "nothing leaked");
}

#[test]
fn a_draft_never_takes_a_later_sequences_decode_token() {
    let mut s = Scheduler::new(cfg(32, 64));
    decoding(&mut s, &[1, 2, 3]);
    s.cfg.max_num_batched_tokens = 6;
    assert!(s.set_draft(1, &[7, 7, 7, 7, 7, 7, 7, 7]));
    let sched = s.schedule();
    let lens: Vec<_> = sched.seqs.iter().map(|x| (x.id, x.len, x.draft)).collect();
    assert_eq!(lens, vec![(1, 4, 3), (2, 1, 0), (3, 1, 0)], "6 tokens: two kept for the decodes after");
    assert_eq!(s.get(1).unwrap().tokens.len(), 7 + 3, "the rest of the draft is dropped");
}

#[test]
fn a_draft_is_cut_to_free_blocks_and_preempts_nothing() {
    // 5 blocks of 4: two sequences of 7 tokens hold 2 each, one block is free.
    let mut s = Scheduler::new(cfg(5, 64));
    decoding(&mut s, &[1, 2]);
    assert_eq!(s.pool().num_free(), 1);
    assert!(s.set_draft(2, &[7; 10]));
    let sched = s.schedule();
    assert!(sched.preempted.is_empty(), "{:?}", sched.preempted);
    let two = sched.seqs.iter().find(|x| x.id == 2).unwrap();
    // Positions 6.. fit in its 2 blocks plus the free one: 12 - 6 = 6 tokens, the token and 5.
    assert_eq!((two.len, two.draft), (6, 5));
    assert_eq!(s.num_running(), 2);
}

#[test]
fn preemption_drops_a_draft_and_abandoning_one_recomputes_the_last_token() {
    let mut s = Scheduler::new(cfg(16, 64));
    decoding(&mut s, &[1]);
    assert!(s.set_draft(1, &[8, 9]));
    s.preempt(1);
    let seq = s.get(1).unwrap();
    assert_eq!((seq.tokens.len(), seq.draft, seq.num_computed), (7, 0, 0), "a recompute sees no draft");
    let mut s = Scheduler::new(cfg(16, 64));
    decoding(&mut s, &[1]);
    assert!(s.set_draft(1, &[8, 9]));
    let sched = s.schedule();
    s.complete(&sched);
    s.abandon_draft(1, 0);
    let seq = s.get(1).unwrap();
    assert_eq!((seq.tokens.len(), seq.num_computed, seq.draft), (7, 6, 0));
    assert!(seq.is_decoding(), "its next step samples from its last token again");
}
