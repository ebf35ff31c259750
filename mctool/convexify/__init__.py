"""The convexify stage: trajectory (the convex trajectory's maths: β strategies, waypoints,
reconstruction, streaming; read by the store, experts, labels and distill) and runner
(`mctool convexify`: a buffer's stored trajectories -> waypoints + β).
"""
