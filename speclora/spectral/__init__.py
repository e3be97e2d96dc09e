"""The spectral machinery of speclora: pure functions on the parameter graph (shared/DESIGN.md).

graph.py (nodes, edges, statistics) → correlation.py (EMA gradient correlations, edge weights) →
laplacian.py (L, L_sym) → eigen.py (k smallest eigenpairs: dense eigh or LOBPCG) → filters.py (spectral
filters, learned coefficients, band energy) and regularizer.py (spectral losses); devices.py (the state's
device, IEEE float32 math, the rank-0 broadcast). callback.py wires them into Lightning, callback_logs.py
is what it logs.
"""

from speclora.spectral.correlation import (
    EdgeCorrelation,
    edge_weights,
    fixed_weights,
    magnitude_weights,
    stack_signals,
    unstack_signals,
)
from speclora.spectral.eigen import (
    DENSE_THRESHOLD,
    DENSE_THRESHOLDS,
    FALLBACK_DENSE_THRESHOLD,
    SOLVERS,
    EigenResult,
    EigenSolverError,
    check_k,
    dense_threshold_for,
    ieee_float32,
    smallest_eigenpairs,
)
from speclora.spectral.filters import (
    TABLE2_EDGES,
    TABLE3_COEFFICIENTS,
    TABLE3_EDGES,
    band_energy,
    band_response,
    coordination_response,
    eigen_lr_response,
    hypergradient_step,
    hypergradient_update,
    low_pass_projector,
    project_low,
    spectral_filter,
)
from speclora.spectral.graph import (
    EDGE_INTER_LAYER,
    EDGE_INTER_TASK,
    EDGE_INTRA,
    EDGE_KINDS,
    KIND_A,
    KIND_B,
    GraphLayout,
    build_edges,
    class_subgraph,
    graph_statistics,
    node_features,
    sparsify_topk,
    to_pyg,
)
from speclora.spectral.laplacian import laplacian, laplacian_dense, spectral_bound
from speclora.spectral.regularizer import (
    dirichlet_energy,
    dirichlet_energy_of,
    high_pass_energy,
    high_pass_energy_projected,
)

__all__ = [
    "DENSE_THRESHOLD",
    "DENSE_THRESHOLDS",
    "EDGE_INTER_LAYER",
    "EDGE_INTER_TASK",
    "EDGE_INTRA",
    "EDGE_KINDS",
    "FALLBACK_DENSE_THRESHOLD",
    "KIND_A",
    "KIND_B",
    "SOLVERS",
    "TABLE2_EDGES",
    "TABLE3_COEFFICIENTS",
    "TABLE3_EDGES",
    "EdgeCorrelation",
    "EigenResult",
    "EigenSolverError",
    "GraphLayout",
    "band_energy",
    "band_response",
    "build_edges",
    "check_k",
    "class_subgraph",
    "coordination_response",
    "dense_threshold_for",
    "dirichlet_energy",
    "dirichlet_energy_of",
    "edge_weights",
    "eigen_lr_response",
    "fixed_weights",
    "graph_statistics",
    "high_pass_energy",
    "high_pass_energy_projected",
    "hypergradient_step",
    "hypergradient_update",
    "ieee_float32",
    "laplacian",
    "laplacian_dense",
    "low_pass_projector",
    "magnitude_weights",
    "node_features",
    "project_low",
    "smallest_eigenpairs",
    "sparsify_topk",
    "spectral_bound",
    "spectral_filter",
    "stack_signals",
    "to_pyg",
    "unstack_signals",
]
