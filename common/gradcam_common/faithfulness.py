"""The faithfulness metrics' names, as Evaluate's ``Metric`` enum spells them in lower case
(``METRIC_DELETION`` is "deletion"), and which way each one is better; the server computes them
(``gradcam_server.faithfulness``), the client prints and plots them."""

METRICS = ("deletion", "insertion", "road_morf", "road_lerf", "road_combined",
           "confidence_change", "average_drop", "increase_in_confidence", "pointing_game")
# Whether a larger value means a more faithful map.
HIGHER_IS_BETTER = {"deletion": False, "insertion": True, "road_morf": False, "road_lerf": True,
                    "road_combined": True, "confidence_change": True, "average_drop": False,
                    "increase_in_confidence": True, "pointing_game": True}
# The metrics with a curve: deletion and insertion per step, ROAD per percentile.
CURVES = ("deletion", "insertion", "road_morf", "road_lerf")
