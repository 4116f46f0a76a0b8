"""The run loop: a prepared dataset and a loaded model to a trained, saved run.

``train`` runs it (load, fit, save, summarise) on the Hugging Face ``trainer`` with the
``arguments`` the config's training section gives; ``outdir`` decides what an output directory
may hold and keeps the run's records there, ``checkpoints`` which checkpoint is complete and
resumes; ``interrupt`` turns a signal or a diverged loss into a clean stop; ``distributed``
launches and coordinates processes; ``stats`` counts padding and keeps the loss curve;
``summary`` is what a finished run reports.
"""
