"""Training features around the loop, each in its own module so that the trainer stays a list of
calls: the non-finite guard (`guard`), the train/* metrics (`metrics`), what happens to the model around
its wrapping (`model`: activation checkpointing, torch.compile, uncompiled names), EMA (`ema`), early
stopping (`early_stop`), the profiler (`profiler`), and hooks named in the config (`extend`)."""
