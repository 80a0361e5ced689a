"""greedymm: the reference replication of Wu et al., ICML 2022, "Characterizing and Overcoming
the Greedy Nature of Learning in Multi-modal Deep Neural Networks"."""

__version__ = "0.1.0"
