"""The IR: layers on a networkx DAG with blobs in single-assignment form (``graph``), shape and cost inference
(``shapes``), load and save of a net's files (``model``), layer classes (``classify``), fillers and random weights
(``initializers``) and drawings of a net (``draw``)."""
