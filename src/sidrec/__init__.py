"""sidrec: generative recommendation with bijective semantic IDs.

Pipeline: prepare data -> embed items -> tokenize (semantic IDs) -> train AR-NTP / FV-MLE /
parallel heads on one backbone -> decode (beam or exact) -> evaluate -> verify the theorem.
"""

__version__ = "0.1.0"
