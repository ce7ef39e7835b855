"""The cluster: launch environments, process groups and rank layout, Slurm job scripts."""
