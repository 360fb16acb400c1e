"""Recurrent-KIF's core in pure torch: importance (Eq. 3-7), masks (Eq. 8), fusion (Eq. 2, 5, 9)."""
