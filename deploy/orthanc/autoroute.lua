-- Orthanc auto-routing to the AI node: forward each series, once Orthanc deems it stable
-- (StableAge seconds without a new instance), if its modality is one the node has routes for.
-- The node's own results (SR, and OT Secondary Captures) are never sent back to it.
-- Load with "LuaScripts": ["autoroute.lua"] and declare the node in "DicomModalities" as "ainode".

local AINODE = 'ainode'
local FORWARD = { CT = true, CR = true, DX = true, OP = true, XC = true, DMS = true }

function OnStableSeries(seriesId, tags, metadata)
   local modality = tags['Modality'] or ''
   if FORWARD[modality] then
      print('AI node: forwarding series ' .. seriesId .. ' (' .. modality .. ')')
      -- One association for the whole series (SendToModality would take instance ids one by one).
      RestApiPost('/modalities/' .. AINODE .. '/store', seriesId)
   end
end
