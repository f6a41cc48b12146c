"""Online anomaly detection (issue 11): what rules cannot name -- a beaconing implant, a
slow exfiltration, a miner below every threshold, a new listener -- reaches a human.

The engine (AnomalyEngine) turns the activity events into per-window features for the
node and each workload (features.py), scores them with streaming detectors
(detectors.py: robust Mahalanobis, Half-Space Trees, LODA; baselines: per-feature EWMA/MAD
z-score and the never-seen-executable rule), turns scores into tail probabilities so a
threshold is a per-window false-alarm rate (calibrate.py: SPOT, a generalised Pareto tail
over a bounded sample), requires persistence and deduplicates, scores periodic outbound
connections RITA-style (beacon.py), compares each profile's slow mean with a reference
frozen at the end of warm-up (anomaly.drift), and snapshots its state as JSON
(persist.py).

Why pure Python (stdlib only, no numpy): it ships to every node inside the agent's
package, and Debian 12's numpy 1.24 / scikit-learn 1.2 do not satisfy river 0.26 (numpy
>= 2.2.5) or pysad 0.7 (scikit-learn >= 1.4.2): those would mean shipping a pinned
wheelhouse (river's wheels with numpy and scipy are tens of MB per architecture and
Python version) and loading numpy into the agent (about 20-30 MB of resident memory).
The vectors here have 14 features and are scored once per 10 s window per active
workload; at that size plain Python costs well under a millisecond per window per
detector (bench/anomaly_cost.py) and the state is a few KB per profile.
"""
from agent.detect.anomaly.config import AnomalyConfig
from agent.detect.anomaly.engine import MODEL_VERSION, AnomalyEngine

__all__ = ["AnomalyConfig", "AnomalyEngine", "MODEL_VERSION"]
