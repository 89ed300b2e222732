-- Orthanc forwards each stable study to the AI node in one association, then tells the node the study
-- is complete, so that the node starts at once instead of after its quiet period (study.stable_seconds).
-- Use instead of autoroute.lua: load with "LuaScripts": ["notify.lua"], declare the node in
-- "DicomModalities" as "ainode", and give the node's address and an API token with the operator role
-- (ainode --config ... tokens create orthanc operator) in Orthanc's environment:
--   AI_NODE_URL=https://ainode.example:8080  AI_NODE_TOKEN=ainode_...
-- (not AINODE_*: the node reads those as its own settings, where it shares the environment).
-- Only series of the modalities the node has routes for are sent, each once: the node's own results
-- (SR, and OT Secondary Captures) make the study stable again, and are never sent back to it.

local AINODE = 'ainode'
local FORWARD = { CT = true, CR = true, DX = true, OP = true, XC = true, DMS = true }
local NODE_URL = os.getenv('AI_NODE_URL') or 'http://127.0.0.1:8080'
local TOKEN = os.getenv('AI_NODE_TOKEN') or ''
local sent = {}  -- Orthanc ids of the series sent since Orthanc started

function OnStableStudy(studyId, tags, metadata)
   local resources = {}
   for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
      if FORWARD[series['MainDicomTags']['Modality'] or ''] and not sent[series['ID']] then
         table.insert(resources, series['ID'])
      end
   end
   if #resources == 0 then
      return
   end
   print('AI node: forwarding ' .. #resources .. ' series of study ' .. studyId)
   -- Synchronous: it returns once the node has acknowledged every instance, so the notification
   -- below comes after all of them.
   RestApiPost('/modalities/' .. AINODE .. '/store', DumpJson({ Resources = resources }, true))
   for _, id in ipairs(resources) do
      sent[id] = true
   end
   HttpPost(NODE_URL .. '/api/studies/' .. tags['StudyInstanceUID'] .. '/complete', '',
            { ['Authorization'] = 'Bearer ' .. TOKEN })
end
