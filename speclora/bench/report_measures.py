"""How each number of the quality report is measured: the text that closes results.md."""

MEASURES = """\
How each number is measured (speclora.bench; same code path as `speclora fit` + `speclora test`):

- **Scores**: the test split of each task (docs/data.md, `split_rule: unolora`), evaluated on the checkpoint
  with the best `val/average` (early stopping on validation), in points; a task's score is the mean of its
  official metrics; the average is the plain mean over tasks. Mean ± sample std over seeds.
- **Seeds**: seed s sets `seed_everything` (data order, heads, dropout) and `model.lora.init_seed` (the shared
  initial A; not for full_ft, which has no LoRA). Few-shot run s trains on LM-BFF subset seed 13/21/42/87/100
  (s mod 5); FewGLUE has one subset, the same for every seed.
- **single**: one LoRA per task trained alone with the same steps, batch and caps as the multi-task runs (so
  each single run sees its task more often: a generous reference). ITR and IC are computed per seed against
  the single run of the same seed (speclora.metrics), over the tasks whose single score is positive.
- **Parameters**: `SpecLoRAModule.trainable_parameters()` (all trainable, and adapter-side = inside the encoder).
- **Time**: wall time of the whole `fit` call (validation included) and that divided by the steps; on a shared
  machine, and with several runs at once, times are indicative only. **Memory**: GPU runs: peak
  `torch.cuda.max_memory_allocated`; CPU runs: peak resident set of the process (VmHWM, reset before the fit;
  with `--isolation inline` or `pool` the process also holds what earlier runs left, so compare CPU memory
  only from `--isolation process` runs).
- **Gradient conflict**: after training, at the tested weights, in eval mode, on the first training batches of
  the seed's mixing order (the same batches for every method), each task's raw loss gradient (no surgery, no
  extra loss). *conflict rate (W)*: share of task pairs with cos < 0 of the gradients on the encoder's attention
  projection weights W (every task's forward uses W + ΔW_t, so this is one space shared by every method);
  *mean cos (W)*: their mean pairwise cosine; *shared trainable*: the same rate on the trainable coordinates
  that two or more tasks move (n/a for per-task adapters, which share none).
- **Convergence**: the first validation step at which `val/average` reaches 95% of its last value (resolution:
  `val_check_interval`); ratio = mean steps of the method / mean steps of independent. *Flat*: the mean
  validation curve over seeds changes by at most 1 point (max − min) over the last fifth of the steps; with a
  linear decay of the rate to 0 the last fifth runs at under a fifth of the peak rate, so a flat tail is
  necessary, not sufficient, for convergence.
- **Learning rates**: each method trains once per rate of its grid (seed 0, or seeds 0..N-1 with
  `--search-seeds N`; the main suite and budget); the rate with the best validation average (the best
  `val/average` of a run, averaged over the search seeds; for `single` also over the suite's tasks) is chosen, ties to the smaller rate; the seeds then run at it (a rate chosen at an end of
  the grid is marked). The ablations run at speclora's rate, the few-shot and one-task cells at their method's.
- **Significance**: paired differences over seeds, d̄ ± t(0.975, n−1)·sd/√n; "better"/"worse" when the
  interval excludes 0. Few seeds give wide intervals: "no significant difference" is not "equal". speclora is
  tested against the best baseline per task, then its average against each baseline; Δ % is the difference
  over the baseline's mean average. `independent` is the seed paper's "vanilla LoRA". Tested against many
  baselines, one of them may come out "better" or "worse" by chance: *p (Holm)* is the p-value adjusted over
  the baselines compared (Holm's step-down), for a 5% chance of any false verdict in the table.
"""
