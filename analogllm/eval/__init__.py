"""Evaluation of digital and analogue models: perplexity (:mod:`.perplexity`), chip × drift-time sweeps
(:mod:`.sweep`), and the JSON / Markdown / PNG reports (:mod:`.report`, :mod:`.plot`)."""
