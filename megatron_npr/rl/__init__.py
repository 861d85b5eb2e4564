"""RL for NPR: DAPO (stage 1) and PAPO (stage 3). `npr rl CONFIG` runs `loop.run_rl`.

    advantages.py  group-relative advantages, DAPO's informative-group test      (pure math)
    rewards.py     DAPO's format/correctness/overlong reward, PAPO's filter     (pure math)
    losses.py      policy losses in the trainer's LossFn form, Clip             (pure math)
    algorithms.py  Algorithm and ALGORITHMS: each algorithm's decisions by name
    config.py      RLConfig (`npr rl`'s YAML)
    prompts.py     the problems (missing answers named) and the reproducible PromptStream
    rollouts.py    RolloutManager: where the engine and grader run, weight sync and versions
    batch.py       rollouts -> samples -> packed rows -> this DP rank's microbatches; mismatch
    step_log.py    what a step records: metrics line, rollout dump, run summary
    loop.py        run_rl: the loop on one screen

Nothing is imported here, so the pure-math modules load without Megatron.
"""
