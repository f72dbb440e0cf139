"""Built-in demo: a small English corpus, a 4096-token BPE, synthetic probes and a hybrid Mamba2+attention teacher."""
