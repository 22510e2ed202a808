"""Bags to models: MIL students, MHIM (teacher, masking, consistency, GRN), training, metrics, survival."""
