"""What is measured on a map: invalid-pixel metrics (:mod:`.invalid`) and ROAD faithfulness
(:mod:`.road`)."""
