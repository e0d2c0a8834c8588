"""Speculative decoding: draft tokens proposed from the request's own context (n-gram prompt lookup),
verified by the target model in one forward with 1 + K positions per sequence.

config.py         SpeculativeConfig (vLLM's --speculative-config shape)
ngram_proposer.py NgramProposer: the tokens that followed the latest earlier occurrence of the context's suffix

The scheduler proposes and schedules the drafts (they travel in SchedulerOutput.scheduled_spec_decode_tokens);
the model runner verifies them (freight/worker/model_runner.py) and returns the accepted tokens plus one.
"""
