"""Matplotlib figures of trajectories.

Every function draws on an `ax` you may pass (or a new figure) and returns the Axes,
so the result can be restyled. Time axes are logarithmic by default, because
training dynamics live on log time scales; `t = 0` cannot sit on a log axis, so the
first save is left out there (it is drawn on linear axes).

For a paper, make the figures inside `gflow.plot.paper("column")` (or `"page"`):
`gflow.plot.figure` then sizes them to the column's width with fonts readable
there, and `gflow.plot.save(fig, "figure.pdf")` writes vector graphics;
`gflow.plot.save_versions` writes a figure both for a screen and for a paper.
"""

from ._edge import edge_of_stability as edge_of_stability
from ._maps import basin_map as basin_map
from ._maps import phase_portrait as phase_portrait
from ._maps import reorder_by_top_eigenvector as reorder_by_top_eigenvector
from ._maps import row_similarity as row_similarity
from ._maps import work_precision as work_precision
from ._style import figure as figure
from ._style import paper as paper
from ._style import save as save
from ._style import save_versions as save_versions
from ._time import attention_scores as attention_scores
from ._time import effective_rank as effective_rank
from ._time import group_losses as group_losses
from ._time import loss as loss
from ._time import mark_time as mark_time
from ._time import phases as phases
from ._time import series as series
