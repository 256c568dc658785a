-- 0010: the id of the dead-letter topic each kept replay position belongs to. A topic deleted
-- and created again under its old name starts its offsets over: its new letters lay below
-- the positions kept for the old one and were never replayed, nor counted in its depth. A
-- position of another topic id is now set aside. NULL for positions kept before this
-- migration (they are still set aside when past the topic's end). A new nullable column: no
-- rewrite, no lock held for long.

ALTER TABLE trueup.replay_positions ADD COLUMN topic_id text;
