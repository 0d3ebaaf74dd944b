"""Stages 2-5: weight matrices -> eigenvalues -> power-law and Marchenko-Pastur fits -> metrics -> phase.

``eigenvalues`` (the ESD, batched, on the weights' device), ``powerlaw``, ``tail_fit``, ``tpl`` and ``fingers`` (the
tail fit and its weightwatcher variants), ``marchenko_pastur`` (the random bulk, Tracy-Widom edge and spikes),
``metrics`` (norms, ranks, entropy), ``phases`` (the 5+1 phases), ``randomize`` (correlation traps), ``synthetic``
(matrices of every phase, for calibration and tests), ``arrays`` (the one input converter below them all). Imports
only :mod:`lightning_htsr.weights`.
"""
