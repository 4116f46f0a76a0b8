"""The run loop: a prepared dataset and a loaded model to a trained, saved run.

``train`` runs it (load, fit, save, summarise) on the Hugging Face ``trainer``; ``checkpoints``
decides what an output directory may hold and which checkpoint resumes; ``interrupt`` turns a
signal or a diverged loss into a clean stop; ``distributed`` launches and coordinates processes;
``stats`` counts padding and keeps the loss curve.
"""
