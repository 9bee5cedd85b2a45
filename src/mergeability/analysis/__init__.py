"""Why does it merge? Statistics over a run's scores and features, and the paper's claims checked against them."""
