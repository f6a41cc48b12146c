"""swarm-agent: node security agent for Swarm GPU providers."""
__version__ = "0.1.0"
